"""Weights in and out, one module per format:

    hf.py     Hugging Face checkpoints: per architecture a table of config fields and tensor names, read both ways
              (`config_from_hf`, `hf_config_for`, `to_ours`, `to_theirs`, `hf_name`)

`llmkit.model.weights` is the front door (`load`, `save_model`, `export_hf`); GGUF (llama.cpp) and llmkit's own run
folders are read there.
"""
