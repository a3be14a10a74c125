"""The `llmkit` command: one subcommand per stage of a language model's life.

Every subcommand takes `--config FILE` (YAML or JSON): its keys are the option names (dashes or
underscores), and options given on the command line win over the file. Errors print one line (what is
wrong, how to fix it) and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmkit import __version__
from llmkit.errors import LlmkitError

LIFECYCLE = """\
the lifecycle:
  tokenizer   train, inspect and compare tokenizers (word, char, bpe, wordpiece, byte-bpe, unigram)
  data        turn a corpus into token shards (clean, de-duplicate, split, tokenize)
  model       presets, parameter counts and FLOPs, export to Hugging Face format
  pretrain    train a decoder (causal LM), encoder (masked LM) or encoder-decoder (span corruption) from scratch
  eval        evaluate a model: perplexity and bits per byte on a text file
  finetune    fine-tune (full, LoRA, adapters) on a task or your data; `finetune compare` sets methods side by side
  generate    continue prompts (or answer them through the chat template), for scripts
  chat        talk with a model in the terminal (SmolLM2-135M-Instruct by default), streaming
  attention   draw a model's attention maps for a sentence (layers x heads)
  demo        run every stage end to end on the embedded defaults

run `llmkit COMMAND --help` for a command's options and examples.
"""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _sub(subparsers, name: str, help: str, examples: tuple[str, ...], handler) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=help, epilog=_examples(*examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="read options from a YAML or JSON file (command-line options win)")
    p.set_defaults(_handler=handler, _parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkit", description="llmkit: train, fine-tune, evaluate and use language models.",
                                     epilog=LIFECYCLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    # --- tokenizer -----------------------------------------------------------------------------
    tok = commands.add_parser("tokenizer", help="train, use and compare tokenizers", description="Train, use and compare tokenizers.",
                              epilog=_examples("llmkit tokenizer train --kind byte-bpe --vocab-size 8192 --source shakespeare --out runs/tok",
                                               "llmkit tokenizer encode --tokenizer runs/tok 'To be, or not to be'",
                                               "llmkit tokenizer compare --source shakespeare --json compare.json"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    tok_cmds = tok.add_subparsers(title="tokenizer commands", metavar="ACTION")
    tok.set_defaults(_parser=tok, _handler=None)

    p = _sub(tok_cmds, "train", "train a tokenizer and save it as DIR/tokenizer.json",
             ("llmkit tokenizer train --kind byte-bpe --vocab-size 8192 --source shakespeare --out runs/tok",
              "llmkit tokenizer train --kind wordpiece --lowercase --source 'notes/*.md' --out runs/wp",
              "llmkit tokenizer train --kind char --source shakespeare:hamlet --out runs/char",
              "llmkit tokenizer train --kind unigram --source rows.jsonl --field body --out runs/uni"), cmd_tokenizer_train)
    _source_options(p)
    p.add_argument("--kind", default="byte-bpe", help="word, char, bpe, wordpiece, byte-bpe or unigram (default: byte-bpe)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including special tokens (default: 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="drop merges/words seen fewer times (default: 2)")
    p.add_argument("--lowercase", action="store_true", help="lower-case text before tokenizing")
    p.add_argument("--sentinels", type=int, default=100, help="number of T5 sentinel tokens <extra_id_N> (default: 100)")
    p.add_argument("--no-chat-tokens", action="store_true", help="leave out the chat role tokens <|system|> <|user|> <|assistant|> <|end|>")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN", help="an extra special token (repeatable)")
    p.add_argument("--out", default="runs/tokenizer", help="output folder (default: runs/tokenizer)")

    p = _sub(tok_cmds, "encode", "print the token ids (or tokens) of a text",
             ("llmkit tokenizer encode --tokenizer runs/tok 'To be, or not to be'",
              "llmkit tokenizer encode --tokenizer smollm2 --tokens 'Hello, world!'",
              "echo 'some text' | llmkit tokenizer encode --tokenizer minilm"), cmd_tokenizer_encode)
    p.add_argument("text", nargs="?", help="the text (default: read standard input)")
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")
    p.add_argument("--tokens", action="store_true", help="print token strings beside the ids")
    p.add_argument("--add-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="add the tokenizer's own special tokens, as transformers does (BERT's [CLS] ... [SEP], Llama 3's bos); "
                        "--no-add-special-tokens for the bare text (default: add)")

    p = _sub(tok_cmds, "decode", "turn token ids back into text",
             ("llmkit tokenizer decode --tokenizer runs/tok 412 77 1021",
              "llmkit tokenizer encode --tokenizer smollm2 'hi' | llmkit tokenizer decode --tokenizer smollm2"), cmd_tokenizer_decode)
    p.add_argument("ids", nargs="*", help="token ids (default: read them from standard input)")
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")
    p.add_argument("--skip-special-tokens", action="store_true", help="leave special tokens out of the text")

    p = _sub(tok_cmds, "info", "describe a tokenizer: kind, vocabulary, special tokens, chat template",
             ("llmkit tokenizer info --tokenizer smollm2", "llmkit tokenizer info --tokenizer runs/tok"), cmd_tokenizer_info)
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")

    p = _sub(tok_cmds, "compare", "train every kind on one corpus and compare them on held-out text",
             ("llmkit tokenizer compare --source shakespeare",
              "llmkit tokenizer compare --source shakespeare --vocab-size 4096 --kinds bpe,byte-bpe --json cmp.json --png cmp.png"),
             cmd_tokenizer_compare)
    _source_options(p)
    p.add_argument("--kinds", default="word,char,bpe,wordpiece,byte-bpe,unigram", help="comma-separated kinds (default: all six)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of each kind (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for measuring (default: 0.1)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--png", metavar="FILE", help="bar chart (default: next to --json, else tokenizer_compare.png)")
    p.add_argument("--save-dir", metavar="DIR", help="save every trained tokenizer in DIR/KIND/")

    # --- data ----------------------------------------------------------------------------------
    data = commands.add_parser("data", help="turn a corpus into token shards", description="Turn a corpus into token shards.",
                               epilog=_examples("llmkit data prepare --source shakespeare --tokenizer runs/tok --out runs/data",
                                                "llmkit data info runs/data"),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    data_cmds = data.add_subparsers(title="data commands", metavar="ACTION")
    data.set_defaults(_parser=data, _handler=None)
    p = _sub(data_cmds, "prepare", "normalize, de-duplicate, split and tokenize a corpus into train.bin / val.bin",
             ("llmkit data prepare --source shakespeare --tokenizer runs/tok --out runs/data",
              "llmkit data prepare --source 'corpus/*.txt' --tokenizer smollm2 --near-dedup --out runs/data",
              "llmkit data prepare --source rows.jsonl --field text --tokenizer runs/tok --val-fraction 0.05 --out runs/data"),
             cmd_data_prepare)
    _source_options(p)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder, GGUF file, 'smollm2' or 'minilm' (required)")
    p.add_argument("--out", default="runs/data", help="output folder (default: runs/data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation (default: 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split (default: 1337)")
    p.add_argument("--unicode-form", default="NFC", help="Unicode normalization: NFC, NFKC, NFD, NFKD or none (default: NFC)")
    p.add_argument("--keep-line-endings", action="store_true", help="do not turn \\r\\n and \\r into \\n")
    p.add_argument("--near-dedup", action="store_true", help="also drop near-duplicate documents (MinHash LSH)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity that counts as near-duplicate (default: 0.8)")
    p = _sub(data_cmds, "info", "show what a shard folder holds", ("llmkit data info runs/data",), cmd_data_info)
    p.add_argument("dir", nargs="?", default="runs/data")

    # --- model ---------------------------------------------------------------------------------
    model = commands.add_parser("model", help="presets, sizes, export", description="Model presets, sizes and export.",
                                epilog=_examples("llmkit model info gpt2", "llmkit model info --all", "llmkit model info smollm2",
                                                 "llmkit model export --model runs/gpt --out runs/gpt-hf"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_cmds = model.add_subparsers(title="model commands", metavar="ACTION")
    model.set_defaults(_parser=model, _handler=None)
    p = _sub(model_cmds, "info", "parameters and FLOPs per token of a preset or a model",
             ("llmkit model info gpt2", "llmkit model info --all", "llmkit model info smollm2 --seq-len 2048"), cmd_model_info)
    p.add_argument("model", nargs="?", help="a preset name (gpt2, llama, bert, t5, vaswani, tiny-*) or a model (path, smollm2, minilm)")
    p.add_argument("--all", action="store_true", help="a table of every preset")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs (default: the context length)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _sub(model_cmds, "export", "write a model as a Hugging Face folder that transformers loads",
             ("llmkit model export --model runs/gpt --out runs/gpt-hf", "llmkit model export --model minilm --out runs/minilm-hf"),
             cmd_model_export)
    p.add_argument("--model", default=None, help="a run folder, Hugging Face folder, GGUF file, smollm2 or minilm (required)")
    p.add_argument("--out", default=None, help="output folder (required)")

    p = _sub(commands, "attention", "draw attention maps (layers x heads) of a sentence as a PNG",
             ("llmkit attention --model smollm2 'The cat sat on the mat because it was tired.'",
              "llmkit attention --model minilm --layers 0,5 --heads 0-3 'Time flies like an arrow.' --out attn.png"), cmd_attention)
    p.add_argument("sentence", nargs="?", default=None, help="the sentence to look at")
    p.add_argument("--model", default="smollm2", help="a model: run folder, Hugging Face folder, GGUF file, smollm2 or minilm")
    p.add_argument("--layers", default=None, help="layers to draw: '0,3,5' or '0-5' (default: all)")
    p.add_argument("--heads", default=None, help="heads to draw: '0,1' or '0-3' (default: all)")
    p.add_argument("--out", default="attention.png", help="the PNG to write (default: attention.png)")

    # --- pretrain --------------------------------------------------------------------------------
    from llmkit.train.pretrain import PretrainConfig

    d = PretrainConfig()
    p = _sub(commands, "pretrain", "pretrain a model from random weights (causal LM, masked LM or span corruption)",
             ("llmkit pretrain                                   # a small GPT on Shakespeare, about five minutes on 2 cores",
              "llmkit pretrain --family encoder --budget 2m --out runs/bert",
              "llmkit pretrain --family encoder-decoder --preset tiny-t5 --budget 1000steps --out runs/t5",
              "llmkit pretrain --data runs/data --preset gpt2 --block-size 1024 --batch-size 16 --precision bf16 --compile",
              "llmkit pretrain --out runs/gpt --resume          # continue a killed run exactly",
              "torchrun --nproc_per_node 2 -m llmkit pretrain --batch-size 16 --out runs/ddp"), cmd_pretrain)
    p.add_argument("--family", default=d.family, choices=["decoder", "encoder", "encoder-decoder"], help="model family (default: decoder)")
    p.add_argument("--preset", default=None, help="model preset (default: cpu-gpt / tiny-bert / tiny-t5 by family); see `llmkit model info --all`")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--n-heads", type=int, default=None, help="override the preset's number of heads")
    p.add_argument("--data", default=d.data, help="a prepared shard folder, or a source to prepare: shakespeare (default), files, a glob")
    p.add_argument("--tokenizer-kind", default=d.tokenizer_kind, help="tokenizer trained when --data is a source (default: byte-bpe)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"its vocabulary (default: {d.vocab_size})")
    p.add_argument("--block-size", type=int, default=d.block_size, help=f"context length in tokens (default: {d.block_size})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per process and micro-step (default: {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a share of the peak (default: 0.1)")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warmup steps (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices (default: 0.1)")
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm (0: off; default: 1.0)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--budget", default=d.budget, help="when to stop: 5m, 300s, 1h, 2000steps, 5Mtokens, or several joined by commas (default: 5m)")
    p.add_argument("--patience", type=int, default=d.patience, help="stop after N evaluations without improvement (0: never)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"evaluate every N steps (default: {d.eval_every})")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help=f"validation windows per evaluation (default: {d.eval_windows})")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: at each evaluation)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"], help="autocast (auto: bf16 where the hardware has it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun (default: DDP)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: datasheet for known GPUs, else measured)")
    p.add_argument("--no-samples", action="store_true", help="do not generate samples at each evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help=f"run folder (default: {d.out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    # --- eval ------------------------------------------------------------------------------------
    ev = commands.add_parser("eval", help="evaluate models", description="Evaluate models.",
                             epilog=_examples("llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
                                              "llmkit eval perplexity --model runs/pretrain --file shakespeare:hamlet --window 128 --stride 64 --json"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ev_cmds = ev.add_subparsers(title="eval commands", metavar="ACTION")
    ev.set_defaults(_parser=ev, _handler=None)
    p = _sub(ev_cmds, "perplexity", "perplexity and bits per byte of a decoder on a text",
             ("llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
              "llmkit eval perplexity --model runs/pretrain --file shakespeare:hamlet --window 128 --stride 64 --json"), cmd_eval_perplexity)
    p.add_argument("--model", default="smollm2", help="a decoder: run folder, Hugging Face folder, GGUF, smollm2")
    p.add_argument("--file", default=None, help="the text: a file, or any --source form (e.g. shakespeare:hamlet) (required)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="start a window every S tokens (default: the window, no overlap)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--json", action="store_true", help="print JSON")

    # --- finetune ----------------------------------------------------------------------------------
    from llmkit.finetune.recipe import FinetuneConfig

    f = FinetuneConfig()
    for name in ("finetune", "finetune-compare"):
        compare_cmd = name == "finetune-compare"
        p = _sub(commands, name, "compare fine-tuning methods on one task: gain against forgetting" if compare_cmd else
                 "fine-tune a model: full, LoRA or bottleneck adapters, with forgetting measured",
                 ("llmkit finetune compare --model smollm2 --task arithmetic --methods full,lora,multitask-lora --shots 0,3",
                  "llmkit finetune compare --model minilm --task genre --methods full,lora") if compare_cmd else
                 ("llmkit finetune --model smollm2 --method lora --task arithmetic --budget 100steps",
                  "llmkit finetune --model smollm2 --method full --task arithmetic:2,reverse:1,sort:1 --lr 5e-5",
                  "llmkit finetune --model minilm --method lora --task genre --budget 200steps",
                  "llmkit finetune --model smollm2 --method lora --data my.jsonl --lora-r 16 --lora-targets q_proj,v_proj",
                  "llmkit finetune --out runs/finetune --resume",
                  "llmkit finetune compare --model smollm2 --task arithmetic   # see its --help"),
                 cmd_finetune_compare if compare_cmd else cmd_finetune)
        if not compare_cmd:
            p.add_argument("--method", default=f.method, choices=["full", "lora", "adapter"], help="what to train (default: lora)")
        else:
            p.add_argument("--methods", default="full,lora,adapter,multitask-lora",
                           help="comma list of full, lora, adapter and multitask-METHOD (trained on a mixture with other tasks)")
            p.add_argument("--shots", default="0,3", help="k-shot in-context accuracy of the untouched model, for each k (default: 0,3)")
            p.add_argument("--curve", default="", help="also train the first method on these numbers of examples, e.g. 100,500,1000")
        p.add_argument("--model", default=f.model, help="smollm2 (default), minilm, or a run / Hugging Face folder")
        p.add_argument("--task", default=f.task, help="arithmetic, reverse, sort, dates, play; a mixture 'arithmetic:2,reverse:1'; genre (encoders)")
        p.add_argument("--eval-task", default=None, help="evaluate on this task (default: the training task)")
        p.add_argument("--data", default=None, help="a JSONL/CSV/TSV file of rows instead of a built-in task")
        p.add_argument("--val-data", default=None, help="validation rows (default: a tenth of --data)")
        p.add_argument("--n-train", type=int, default=f.n_train, help=f"built-in task: training examples (default: {f.n_train})")
        p.add_argument("--n-val", type=int, default=f.n_val, help=f"built-in task: validation examples (default: {f.n_val})")
        p.add_argument("--budget", default=f.budget, help=f"when to stop: steps or time (default: {f.budget})")
        p.add_argument("--batch-size", type=int, default=f.batch_size)
        p.add_argument("--grad-accum", type=int, default=f.grad_accum)
        p.add_argument("--lr", type=float, default=None, help="learning rate (default: full 5e-5, lora and adapter 1e-3)")
        p.add_argument("--warmup", type=int, default=f.warmup)
        p.add_argument("--max-len", type=int, default=f.max_len, help="longest example in tokens; longer ones are dropped (or cut with --truncate)")
        p.add_argument("--truncate", action="store_true", help="cut examples longer than --max-len instead of dropping them")
        p.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
        p.add_argument("--train-on-prompt", action="store_true", help="also put the loss on the prompt tokens")
        p.add_argument("--lora-r", type=int, default=f.lora_r)
        p.add_argument("--lora-alpha", type=float, default=f.lora_alpha)
        p.add_argument("--lora-dropout", type=float, default=f.lora_dropout)
        p.add_argument("--lora-targets", default=f.lora_targets, help="all-linear, names (q_proj,v_proj) or a regular expression")
        p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
        p.add_argument("--adapter-size", type=int, default=f.adapter_size, help="bottleneck width of the adapters")
        p.add_argument("--precision", default=f.precision, choices=["auto", "fp32", "bf16"])
        p.add_argument("--max-new-tokens", type=int, default=f.max_new_tokens, help="answer length when evaluating")
        p.add_argument("--forgetting-tasks", default=f.forgetting_tasks, help="built-in tasks measured before and after (those not trained on)")
        p.add_argument("--n-forgetting", type=int, default=f.n_forgetting, help="examples per untrained task (default: 24)")
        p.add_argument("--general-tokens", type=int, default=f.general_tokens, help="tokens of general text scored (default: 2048)")
        p.add_argument("--general-text", default=f.general_text, help="held-out general text for bits per byte (default: shakespeare:the-tempest)")
        p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (always at the end)")
        p.add_argument("--seed", type=int, default=f.seed)
        p.add_argument("--out", default=f.out if not compare_cmd else "runs/finetune-compare")
        if not compare_cmd:
            p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
            p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")

    # --- generate and chat ------------------------------------------------------------------------
    p = _sub(commands, "generate", "continue prompts, or answer them through the chat template (--chat)",
             ("llmkit generate --model smollm2 --prompt 'Once upon a time' --max-new-tokens 50",
              "llmkit generate --model smollm2 --chat --greedy --prompt 'What is the capital of France?'",
              "llmkit generate --model runs/pretrain --prompt 'ROMEO:' --temperature 0.8 --top-k 50 --seed 1",
              "echo 'To be, or not to be' | llmkit generate --model smollm2 --json",
              "llmkit generate --model smollm2 --prompts-file prompts.jsonl --field prompt --json"), cmd_generate)
    _generation_options(p)
    p.add_argument("--prompt", default=None, help="the prompt (default: standard input, one prompt)")
    p.add_argument("--prompts-file", default=None, help="a JSONL file of prompts (field --field), generated in batches")
    p.add_argument("--field", default="prompt", help="the prompt field of --prompts-file rows (default: prompt)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print JSON lines: prompt, new token ids, new text, finish reason")

    p = _sub(commands, "chat", "talk with a model in the terminal; answers stream",
             ("llmkit chat", "llmkit chat --model smollm2 --system 'You are a pirate.' --temperature 0.7 --quantize int8",
              "llmkit chat --model runs/sft --greedy"), cmd_chat)
    _generation_options(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="the system message")

    # --- demo ----------------------------------------------------------------------------------
    p = _sub(commands, "demo", "run the lifecycle end to end on the embedded defaults (Shakespeare)",
             ("llmkit demo", "llmkit demo --out runs/demo --vocab-size 2048 --pretrain-budget 5m"), cmd_demo)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the tokenizers (default: 4096)")
    p.add_argument("--pretrain-budget", default="2m", help="budget of the pretraining stage (default: 2m)")
    p.add_argument("--finetune-budget", default="40steps", help="budget of the LoRA stage (default: 40steps)")
    return parser


def _generation_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--model", default="smollm2", help="a decoder or encoder-decoder: run folder, Hugging Face folder, GGUF, smollm2")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate (default: {max_new_tokens})")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.9, help="sample among the tokens holding this much probability (default: 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens already seen (1.0: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (encoder-decoders)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--truncate", action="store_true", help="cut a prompt that does not fit the context instead of refusing it")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and activations (default: fp32)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only int8 linear layers: about 3x faster CPU decoding")


def _generation_config(args):
    from llmkit.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_strings=list(args.stop),
                           seed=args.seed, truncate=args.truncate, num_beams=args.num_beams)
    cfg.check()  # before the model loads: a bad value fails in a second, not after it
    return cfg


def _load_for_generation(name: str, dtype: str = "fp32", quantize: str | None = None):
    import torch

    import llmkit

    model = llmkit.load(name, dtype=torch.bfloat16 if dtype == "bf16" else None, quantize=quantize)
    if model.config.family == "encoder":
        raise LlmkitError(f"{name} is an encoder; it does not generate text", "use a decoder or an encoder-decoder model")
    if model.tokenizer is None:
        raise LlmkitError(f"{name} has no tokenizer", "use a model folder with tokenizer.json")
    return model


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=None, metavar="SRC",
                   help="'shakespeare' (or shakespeare:PLAY, shakespeare/GENRE), a .txt/.md/.jsonl file, a folder or a glob; repeatable")
    p.add_argument("--field", default="text", help="the text field of JSONL rows (default: text)")


# --- config files ----------------------------------------------------------------------------------


def _load_config(path: str) -> dict:
    file = Path(path)
    if not file.exists():
        raise LlmkitError(f"config file {path} does not exist", "check the path given to --config")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise LlmkitError(f"config file {path} does not parse ({str(e).splitlines()[0]})", "fix its YAML/JSON syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlmkitError(f"config file {path} must hold a mapping of option: value", "write it as `option: value` lines")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub: argparse.ArgumentParser = args._parser
        config = _load_config(args.config)
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise LlmkitError(f"config file {args.config} has unknown option(s): {', '.join(unknown)}",
                              f"use option names of `llmkit {' '.join(a for a in argv if not a.startswith('-'))[:40]} --help`")
        for key in ("source", "special"):  # append options: a config value replaces the default list
            if key in config and isinstance(config[key], str):
                config[key] = [config[key]]
        sub.set_defaults(**config)
        args = parser.parse_args(argv)
    return args


# --- handlers ---------------------------------------------------------------------------------------


def _console():
    from llmkit.progress import console

    return console


def _read_corpus(args):
    from llmkit.data.sources import read_source

    corpus = read_source(args.source or ["shakespeare"], field=args.field)
    for w in corpus.warnings:
        _console().print(f"[yellow]warning:[/] {w}")
    return corpus


def cmd_tokenizer_train(args) -> None:
    from llmkit.data.clean import normalize
    from llmkit.tokenizer import SpecialTokens, train_tokenizer

    corpus = _read_corpus(args)
    special = SpecialTokens(chat=not args.no_chat_tokens, sentinels=args.sentinels, extra=list(args.special))
    tok = train_tokenizer([normalize(t) for t in corpus.texts], args.kind, args.vocab_size, min_frequency=args.min_frequency,
                          lowercase=args.lowercase, special=special, show_progress=sys.stderr.isatty())
    tok.info["source"] = args.source or ["shakespeare"]
    out = tok.save(args.out)
    print(f"trained a {args.kind} tokenizer with {tok.vocab_size:,} tokens in {tok.info['train_seconds']:.1f}s on "
          f"{len(corpus.documents)} documents -> {out / 'tokenizer.json'}")


def cmd_tokenizer_encode(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=args.add_special_tokens)
    if args.tokens:
        for i in ids:
            print(f"{i}\t{tok.backend.id_to_token(i)!r}")
    else:
        print(" ".join(map(str, ids)))


def cmd_tokenizer_decode(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError:
        raise LlmkitError("token ids must be whole numbers", "pass ids like `412 77 1021`") from None
    sys.stdout.write(tok.decode(ids, skip_special_tokens=args.skip_special_tokens) + "\n")


def cmd_tokenizer_info(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(f"kind         {tok.kind}")
    print(f"vocabulary   {tok.vocab_size:,}")
    for role, token in tok.special.items():
        print(f"{role:<12} {token!r} = {tok.token_id(role)}")
    print(f"sentinels    {len(tok.sentinel_ids)}")
    print(f"fingerprint  {tok.fingerprint()}")
    print(f"chat template {'yes' if tok.chat_template else 'no'}")


def cmd_tokenizer_compare(args) -> None:
    from llmkit import io
    from llmkit.data.clean import normalize
    from llmkit.tokenizer.compare import compare, plot, print_table
    from llmkit.tokenizer.train import KINDS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise LlmkitError(f"unknown tokenizer kind(s): {', '.join(bad)}", f"use some of: {', '.join(KINDS)}")
    corpus = _read_corpus(args)
    console = _console()
    rows = compare([normalize(t) for t in corpus.texts], kinds, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   seed=args.seed, save_dir=args.save_dir, log=lambda m: console.print(f"[dim]{m}[/]"))
    print_table(rows, console)
    if args.json:
        io.write_json(args.json, {"source": args.source or ["shakespeare"], "vocab_size": args.vocab_size, "rows": rows})
        print(f"table -> {args.json}")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else "tokenizer_compare.png")
    plot(rows, png)
    print(f"chart -> {png}")


def cmd_data_prepare(args) -> None:
    from llmkit.data.prepare import prepare

    if not args.tokenizer:
        raise LlmkitError("`llmkit data prepare` needs --tokenizer", "train one with `llmkit tokenizer train`, or use --tokenizer smollm2")
    form = None if str(args.unicode_form).lower() == "none" else args.unicode_form
    if form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise LlmkitError(f"unknown Unicode form {args.unicode_form!r}", "use NFC, NFKC, NFD, NFKD or none")
    meta = prepare(args.source or ["shakespeare"], args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   unicode_form=form, newlines=not args.keep_line_endings, near_dedup=args.near_dedup,
                   near_threshold=args.near_threshold, field=args.field, log=lambda m: _console().print(m))
    if meta["replaced_invalid_utf8_bytes"]:
        _console().print(f"[yellow]warning:[/] {meta['replaced_invalid_utf8_bytes']} invalid UTF-8 byte(s) were replaced by U+FFFD")
    print(f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens ({meta['dtype']}) -> {args.out}")


def cmd_data_info(args) -> None:
    from llmkit.data.loader import load_meta

    print(json.dumps(load_meta(args.dir), indent=2))


def _cfg_row(name: str, cfg, seq_len) -> dict:
    flops = cfg.flops_per_token(seq_len)
    return {"name": name, "family": cfg.family, "params": cfg.param_count(), "d_model": cfg.d_model, "layers": cfg.n_layers,
            "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "context": cfg.max_seq_len, "position": cfg.position,
            "activation": cfg.activation, "norm": f"{cfg.norm} ({cfg.norm_position})", "flops_per_token_forward": flops["forward"],
            "flops_per_token_train": flops["train"]}


def cmd_model_info(args) -> None:
    from llmkit.model.config import PRESETS, preset

    if args.all:
        rows = [_cfg_row(n, preset(n), args.seq_len) for n in PRESETS]
    elif not args.model:
        raise LlmkitError("`llmkit model info` needs a preset or a model", f"e.g. `llmkit model info gpt2`; presets: {', '.join(PRESETS)}")
    elif args.model in PRESETS:
        rows = [_cfg_row(args.model, preset(args.model), args.seq_len)]
    else:
        import llmkit

        rows = [_cfg_row(args.model, llmkit.load(args.model).config, args.seq_len)]
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=2))
        return
    from rich.table import Table

    table = Table(title="models (FLOPs per token: 6N + 12·L·d·T for training, a third of it forward)")
    for col in ("name", "family", "params", "d_model", "layers", "heads/kv", "context", "position", "activation", "norm",
                "GFLOPs/token fwd", "GFLOPs/token train"):
        table.add_column(col, justify="left" if col in ("name", "family", "position", "activation", "norm") else "right")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['params']:,}", str(r["d_model"]), str(r["layers"]), f"{r['heads']}/{r['kv_heads']}",
                      str(r["context"]), r["position"], r["activation"], r["norm"], f"{r['flops_per_token_forward'] / 1e9:.3f}",
                      f"{r['flops_per_token_train'] / 1e9:.3f}")
    from rich.console import Console

    Console(width=200).print(table)


def cmd_model_export(args) -> None:
    import llmkit
    from llmkit.model.weights import export_hf

    if not args.model or not args.out:
        raise LlmkitError("`llmkit model export` needs --model and --out", "e.g. `llmkit model export --model runs/gpt --out runs/gpt-hf`")
    model = llmkit.load(args.model)
    export_hf(model, args.out, tokenizer=model.tokenizer)
    print(f"exported {model.config.family} ({model.config.param_count():,} parameters) -> {args.out}")


def _index_list(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    out = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise LlmkitError(f"cannot read the list {spec!r}", "write it like '0,2,5' or '0-3'") from None
    return out


def cmd_attention(args) -> None:
    import llmkit
    from llmkit.model.attention_plot import attention_for_text, plot_attention

    if not args.sentence:
        raise LlmkitError("`llmkit attention` needs a sentence", "e.g. `llmkit attention --model smollm2 'The cat sat on the mat.'`")
    model = llmkit.load(args.model)
    labels, maps = attention_for_text(model, args.sentence)
    plot_attention(labels, maps, args.out, layers=_index_list(args.layers), heads=_index_list(args.heads),
                   title=f"{args.model}: attention of {len(labels)} tokens")
    print(f"{len(maps)} layers x {maps[0].shape[0]} heads, {len(labels)} tokens -> {args.out}")


def cmd_pretrain(args) -> None:
    import dataclasses

    from llmkit.train.pretrain import PretrainConfig, pretrain

    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["samples"] = not args.no_samples
    pretrain(PretrainConfig(**values), log=lambda m: _console().print(m))


def cmd_eval_perplexity(args) -> None:
    import llmkit
    from llmkit.evaluate.perplexity import evaluate_text

    if not args.file:
        raise LlmkitError("`llmkit eval perplexity` needs --file", "e.g. --file hamlet.txt or --file shakespeare:hamlet")
    model = llmkit.load(args.model)
    if model.config.family != "decoder":
        raise LlmkitError(f"perplexity needs a decoder; {args.model} is a {model.config.family}", "use a decoder model")
    if model.tokenizer is None:
        raise LlmkitError(f"{args.model} has no tokenizer", "use a model folder with tokenizer.json")
    if args.window > model.config.max_seq_len:
        raise LlmkitError(f"window {args.window} is longer than the model's context of {model.config.max_seq_len}",
                          f"use --window {model.config.max_seq_len} or less")
    from llmkit.data.sources import read_source

    text = "\n\n".join(read_source(args.file).texts)
    scores = evaluate_text(model, model.tokenizer, text, args.window, args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens)
    out = {"model": args.model, "file": args.file, "window": args.window, "stride": args.stride or args.window, **scores}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['tokens']:,} tokens scored: {out['nats_per_token']:.4f} nats/token, perplexity {out['perplexity']:.3f}, "
              f"{out['bits_per_byte']:.4f} bits per byte")


def _finetune_config(args):
    import dataclasses

    from llmkit.finetune.recipe import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_finetune(args) -> None:
    from llmkit.finetune.recipe import finetune

    console = _console()
    result = finetune(_finetune_config(args), log=lambda m: console.print(m, markup=False, highlight=False))
    if args.json:
        print(json.dumps(result))


def cmd_finetune_compare(args) -> None:
    from llmkit.finetune.compare import compare

    skip = {"methods", "shots", "curve", "out", "config", "_handler", "_parser", "debug"}
    base = []
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        base += [flag] if value is True else [flag, str(value)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m.removeprefix("multitask-") not in ("full", "lora", "adapter"):
            raise LlmkitError(f"unknown method {m!r}", "use full, lora, adapter or multitask-lora (etc.)")
    console = _console()
    summary = compare(base, methods, Path(args.out), task=args.task, model=args.model,
                      shots=[int(k) for k in args.shots.split(",") if k.strip()] if args.task != "genre" else [],
                      curve=[int(n) for n in args.curve.split(",") if n.strip()], n_val=args.n_val, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, log=lambda m: console.print(m))
    from rich.table import Table

    table = Table(title=f"fine-tuning {args.model} on {args.task}")
    for col in ("method", "train ex.", "trainable", "before", "after", "gain", "general bpb change", "untrained tasks change",
                "embedding cosine", "seconds", "peak MB"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in summary["rows"]:
        table.add_row(r["method"], fmt(r["n_train"], "d") if r["n_train"] else "", f"{r['trainable_share']:.2%}", f"{r['before']:.3f}",
                      f"{r['after']:.3f}", f"{r['gain']:+.3f}", fmt(r["general_bpb_change"], "+.4f"), fmt(r["untrained_change"], "+.3f"),
                      fmt(r["embedding_drift"], ".3f"), f"{r['seconds']:.0f}", f"{r['peak_memory_mb']:.0f}")
    from rich.console import Console

    Console(width=200).print(table)
    for k, acc in summary["few_shot"].items():
        print(f"{k}-shot in-context (no training): {acc:.3f}")
    print(f"table -> {Path(args.out) / 'compare.json'}, chart -> {Path(args.out) / 'compare.png'}")


def cmd_generate(args) -> None:
    from llmkit.chat import chat_prompt_ids
    from llmkit.generate import generate, stream

    cfg = _generation_config(args)
    if args.prompts_file:
        rows = [json.loads(line) for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows, 1) if args.field not in r]
        if missing:
            raise LlmkitError(f"{args.prompts_file}: line {missing[0]} has no field {args.field!r}", "pass --field with the prompt field's name")
        prompts = [str(r[args.field]) for r in rows]
    else:
        prompts = [args.prompt if args.prompt is not None else sys.stdin.read()]
    if any(not p.strip() for p in prompts):
        raise LlmkitError("a prompt is empty", "give every prompt some text")
    model = _load_for_generation(args.model, args.dtype, args.quantize)
    tok = model.tokenizer
    if args.chat:
        prompts = [chat_prompt_ids(tok, ([{"role": "system", "content": args.system}] if args.system else []) +
                                   [{"role": "user", "content": p}]) for p in prompts]
    warn = lambda m: _console().print(f"[yellow]{m}[/]")  # noqa: E731  (the console writes to stderr)
    if len(prompts) == 1 and not args.json and model.config.family == "decoder":
        for piece in stream(model, tok, prompts[0], cfg, warn=warn):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i in range(0, len(prompts), args.batch_size):
        for g in generate(model, tok, prompts[i:i + args.batch_size], cfg, warn=warn):
            if args.json:
                print(json.dumps({"prompt": tok.decode(g.prompt_ids), "ids": g.ids, "text": g.text, "finish_reason": g.finish_reason},
                                 ensure_ascii=False))
            else:
                print(g.text)


def cmd_chat(args) -> None:
    from llmkit.chat import ChatSession

    model = _load_for_generation(args.model, args.dtype, args.quantize)
    console = _console()
    session = ChatSession(model, model.tokenizer, system=args.system, config=_generation_config(args),
                          warn=lambda m: console.print(f"[yellow]{m}[/]"))
    console.print(f"[bold]chatting with {args.model}[/] — /reset, /system TEXT, /save FILE, /exit; Ctrl-C stops an answer")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(type /exit or press Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            console.print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system"):].strip() or None
            console.print(f"(system message {'set' if session.system else 'removed'})")
            continue
        if text.startswith("/save"):
            path = text[len("/save"):].strip() or "chat.json"
            session.save(path)
            console.print(f"(saved to {path})")
            continue
        if text.startswith("/"):
            console.print("(commands: /reset, /system TEXT, /save FILE, /exit)")
            continue
        sys.stdout.write("assistant> ")
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except LlmkitError as e:
            console.print(f"[red]{e.message}[/] — {e.fix}")
        sys.stdout.write("\n")


def cmd_demo(args) -> None:
    from llmkit.demo import run_demo

    run_demo(args.out, vocab_size=args.vocab_size, pretrain_budget=args.pretrain_budget, finetune_budget=args.finetune_budget)


# --- entry point ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # `llmkit finetune compare ...` is the finetune-compare command
        if a == "finetune" and argv[i + 1] == "compare":
            argv[i:i + 2] = ["finetune-compare"]
            break
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        if getattr(args, "_handler", None) is None:
            (getattr(args, "_parser", None) or build_parser()).print_help()
            return 0 if not argv or argv == ["--debug"] else 2
        args._handler(args)
        return 0
    except LlmkitError as e:
        if debug:
            raise
        print(f"llmkit: error: {e.message}" + (f" — fix: {e.fix}" if e.fix else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, or an error from a library we did not anticipate
        if debug:
            raise
        print(f"llmkit: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
