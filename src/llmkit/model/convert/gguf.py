"""GGUF files (llama.cpp): the Llama family's names, its RoPE settings and its tokenizer read from the file; tensors
dequantized by the `gguf` package, and the Q4_0 / Q4_1 / Q8_0 blocks kept as stored for exact fast decoding."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import torch

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model import build_model
from llmkit.model.config import ModelConfig
from llmkit.model.convert.tensors import check_state_names, copy_tensors
from llmkit.tokenizer.pretrained import tokenizer_from_gguf_fields


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its RoPE layout; undo it for the `rotate_half` layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_rope_scaling(fields: dict, rope_freqs: torch.Tensor | None, context: int) -> dict | None:
    """A GGUF's RoPE scaling: llama.cpp's `rope_freqs` factors (Llama 3.1), or `rope.scaling.type` linear / yarn."""
    kind = fields.get("llama.rope.scaling.type", "none")
    factor = fields.get("llama.rope.scaling.factor")
    if rope_freqs is not None:  # llama.cpp applies both: frequency / (factor x linear factor)
        linear = factor if kind == "linear" and factor else 1.0
        return {"rope_type": "freq_factors", "factors": [float(x) * linear for x in rope_freqs.flatten()]}
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": fields.get("llama.rope.scaling.original_context_length") or context,
        }
    raise LlmkitError(f"GGUF RoPE scaling {kind!r} is not implemented", "use a GGUF with linear or yarn scaling, rope_freqs, or none")


def _gguf_block_type(reader) -> str | None:
    """The quantization of most of a GGUF's block matrices ("Q4_1", "Q8_0", "F16", ...): what the file's quality is."""
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


def load_gguf(path: str | os.PathLike, dtype=None) -> tuple[torch.nn.Module, object]:
    """A Llama-architecture GGUF file -> (Decoder with dequantized weights in `dtype` (float32 by default), Tokenizer).
    Each tensor is cast as it is dequantized, so a bf16 load never holds a float32 copy of the model."""
    import gguf

    reader = io.open_gguf(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise LlmkitError(f"GGUF architecture {arch!r} is not supported", "use a Llama-family GGUF (SmolLM2, Llama, TinyLlama, ...)")
    g = lambda key, default=None: fields.get(f"llama.{key}", default)  # noqa: E731
    tokens = fields["tokenizer.ggml.tokens"]
    d, nh = g("embedding_length"), g("attention.head_count")
    # llama.cpp stops on every end-of-generation id: eos, end of turn, end of message
    eos = list(dict.fromkeys(i for i in (fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")) if i is not None))
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        rope_freqs = torch.from_numpy(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).copy())
    context = g("context_length", 2048)
    cfg = ModelConfig(
        family="decoder",
        vocab_size=g("vocab_size") or len(tokens),
        d_model=d,
        n_layers=g("block_count"),
        n_heads=nh,
        n_kv_heads=g("attention.head_count_kv") or nh,
        head_dim=g("attention.key_length") or d // nh,
        d_ff=g("feed_forward_length"),
        max_seq_len=context,
        position="rope",
        rope_theta=g("rope.freq_base", 10000.0),
        rope_scaling=_gguf_rope_scaling(fields, rope_freqs, context),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        norm_position="pre",
        bias=False,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        extra={"source": "gguf", "name": fields.get("general.name")},
    )
    names = {"token_embd.weight": "embed.tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
    per_layer = {
        "attn_norm": "attn_norm.weight",
        "attn_q": "attn.q_proj.weight",
        "attn_k": "attn.k_proj.weight",
        "attn_v": "attn.v_proj.weight",
        "attn_output": "attn.o_proj.weight",
        "ffn_norm": "mlp_norm.weight",
        "ffn_gate": "mlp.gate_proj.weight",
        "ffn_up": "mlp.up_proj.weight",
        "ffn_down": "mlp.down_proj.weight",
    }
    ours = {}
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
        name = f"blocks.{m.group(1)}.{per_layer[m.group(2)]}" if m and m.group(2) in per_layer else names.get(t.name)
        if name is None and t.name != "rope_freqs.weight":
            raise LlmkitError(f"{path} holds a tensor llmkit does not know: {t.name}", "use a plain Llama-architecture GGUF")
        if name is not None:
            ours[t.name] = (name, tuple(reversed([int(x) for x in t.shape])), m.group(2) if m else None)
    model = build_model(cfg, empty=True, dtype=dtype)
    check_state_names(model, {name: shape for name, shape, _ in ours.values()}, source=str(path))

    def stream():  # dequantized one tensor at a time, straight into the model
        for t in reader.tensors:
            if t.name not in ours:
                continue
            name, shape, kind = ours[t.name]
            array = gguf.quants.dequantize(t.data, t.tensor_type)
            w = (torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)).reshape(shape)
            if kind == "attn_q":
                w = _unpermute_qk(w, cfg.n_heads)
            elif kind == "attn_k":
                w = _unpermute_qk(w, cfg.n_kv_heads)
            yield name, w

    copy_tensors(model, stream())
    # what the file's matrices are stored as (not saved with the config: a fine-tuned copy's weights are off that grid)
    model.gguf_weights = _gguf_block_type(reader)
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
    blocks = {
        t.name: (ours[t.name][0], heads.get(ours[t.name][2]))
        for t in reader.tensors
        if t.name in ours and t.tensor_type.name in BLOCK_KINDS and len(t.shape) == 2
    }
    model.gguf_blocks = GGUFBlocks(path, blocks) if blocks else None  # None: no matrix in blocks llmkit decodes exactly
    return model, tokenizer_from_gguf_fields(fields, str(path))


BLOCK_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # the blocks llmkit decodes exactly from the file (`quantize.BlockLinear`)


class GGUFBlocks:
    """Where a GGUF model's quantized matrices came from, to read their blocks again exactly as the file holds them
    (`quantize(model, "gguf")`): each tensor's raw bytes, (rows, blocks, bytes per block), rows in our order."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, tuple[str, int | None]]):
        self.path, self.tensors = Path(path), tensors  # GGUF name -> (our name, heads whose q/k rows llama.cpp interleaved)

    def read(self) -> dict[str, tuple[str, torch.Tensor]]:
        """our name -> (block kind, uint8 tensor (rows, blocks, bytes per block))."""
        import gguf

        reader = io.open_gguf(self.path)
        out = {}
        for t in reader.tensors:
            if t.name not in self.tensors:
                continue
            name, heads = self.tensors[t.name]
            kind = t.tensor_type.name
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            raw = torch.from_numpy(t.data.copy()).reshape(t.data.shape[0], -1, size)  # (rows, blocks, bytes)
            out[name] = (kind, _unpermute_qk(raw, heads) if heads else raw)
        return out
