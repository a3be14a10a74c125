"""Evaluation: measuring models (and tokenizers) on known data.

perplexity.py   perplexity and bits per byte over sliding windows
metrics.py      the standard metrics of a file of predictions (BLEU, chrF, ROUGE, METEOR, exact match, F1,
                accuracy, MCC, ROC-AUC, ...), with bootstrap intervals
harness.py      LlmkitLM: llmkit's models inside lm-evaluation-harness; tasks.py: the built-in tasks and the runner
glue.py         GLUE and SuperGLUE in their official layouts, scored with their official metrics
arena.py        Elo, Bradley-Terry and A/B tests over human votes; report.py: runs side by side
tokenizers.py   tokenizer kinds compared on held-out text (compression, unknown rate, speed)
"""
