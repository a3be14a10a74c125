"""Write small Llama-architecture GGUF files for tests, the way llama.cpp's converter lays them out: q/k rows permuted
for its RoPE, F32 tensors, the tokenizer as metadata, and (Llama 3.1) the `rope_freqs` factors."""

from __future__ import annotations

import numpy as np
import torch


def _permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's `permute` in convert_hf_to_gguf.py (the inverse of llmkit's `_unpermute_qk`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_llama_gguf(path, hf_model, tokenizer_fields: dict, *, rope_freqs: torch.Tensor | None = None, extra: dict | None = None) -> None:
    """`hf_model` is a transformers LlamaForCausalLM (None: a file with the tokenizer only); `tokenizer_fields` are GGUF
    `tokenizer.*` values (tokens, merges, token types, ids, pre, flags); `extra` adds `llama.*` keys (e.g. rope scaling)."""
    from pathlib import Path

    import gguf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    if hf_model is not None:
        _write_model_metadata(w, hf_model.config)
    for key, value in (extra or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    _write_tokenizer(w, tokenizer_fields)
    if hf_model is not None:
        _write_tensors(w, hf_model)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_model_metadata(w, cfg) -> None:
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def _write_tokenizer(w, t: dict) -> None:
    w.add_tokenizer_model("gpt2")
    if t.get("pre") is not None:
        w.add_tokenizer_pre(t["pre"])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["token_type"])
    w.add_token_merges(t["merges"])
    for name in ("bos", "eos", "eot", "padding"):
        if t.get(name) is not None:
            getattr(
                w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "eot": "add_eot_token_id", "padding": "add_pad_token_id"}[name]
            )(t[name])
    if t.get("add_bos") is not None:
        w.add_add_bos_token(t["add_bos"])


def _write_tensors(w, hf_model) -> None:
    cfg = hf_model.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in hf_model.state_dict().items():
        tensor = tensor.detach().float()
        if name in names:
            out = names[name]
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            out = f"blk.{i}.{layer[rest]}.weight"
            if rest == "self_attn.q_proj":
                tensor = _permute_qk(tensor, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                tensor = _permute_qk(tensor, cfg.num_key_value_heads)
        w.add_tensor(out, np.ascontiguousarray(tensor.numpy()))


def smollm2_tokenizer_fields(**overrides) -> dict:
    """The embedded SmolLM2 GGUF's tokenizer metadata, with `overrides` (pre, add_bos, eot, ...)."""
    from llmkit.embedded import embedded_path
    from llmkit.tokenizer.pretrained import gguf_fields

    f = gguf_fields(embedded_path("smollm2"), "tokenizer.")
    out = {
        "tokens": f["tokenizer.ggml.tokens"],
        "token_type": f["tokenizer.ggml.token_type"],
        "merges": f["tokenizer.ggml.merges"],
        "bos": f["tokenizer.ggml.bos_token_id"],
        "eos": f["tokenizer.ggml.eos_token_id"],
        "padding": f["tokenizer.ggml.padding_token_id"],
        "pre": f["tokenizer.ggml.pre"],
    }
    out.update(overrides)
    return out
