"""GGUF files (llama.cpp) in and out, for the architectures llama.cpp calls `llama`, `qwen2` and `qwen3`.

In: the names, RoPE settings and tokenizer read from the file; tensors dequantized by the `gguf` package, and the
Q4_0 / Q4_1 / Q8_0 blocks kept as stored for exact fast decoding. Out (`export_gguf`): written with the `gguf` package
(llama.cpp's own writer), metadata as llama.cpp's converter writes it, matrices in f32, f16, q8_0 or q4_0.

One table serves both ways: llama.cpp's tensor names against ours, and per architecture what makes it differ.

    llama    q/k rows interleaved for llama.cpp's RoPE (its converter permutes them; the reader undoes it)
    qwen2    biases on q, k and v (none on o or the feed-forward); RoPE in the NEOX (rotate_half) layout, as stored
    qwen3    each head's queries and keys RMS-normalized before RoPE (attn_q_norm, attn_k_norm); NEOX layout
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model import build_model
from llmkit.model.config import ModelConfig
from llmkit.model.convert.tensors import check_state_names, copy_tensors
from llmkit.model.layers import rope_frequencies
from llmkit.tokenizer.pretrained import gguf_tokenizer_fields, tokenizer_from_gguf_fields

# llama.cpp's tensor names (gguf-py's TENSOR_NAMES) -> ours; a layer's names are "blk.{i}.<name>.weight|bias"
GLOBAL_TENSORS = {"token_embd": "embed.tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture
    interleaved: bool  # llama.cpp's "normal" RoPE: the converter interleaves q/k rows (llama); False: NEOX, as stored
    qkv_bias: bool = False  # q, k, v have biases (o and the feed-forward none)
    qk_norm: bool = False


GGUF_ARCHITECTURES = {
    a.name: a
    for a in (
        GGUFArchitecture("llama", interleaved=True),
        GGUFArchitecture("qwen2", interleaved=False, qkv_bias=True),
        GGUFArchitecture("qwen3", interleaved=False, qk_norm=True),
    )
}


_LAYER_KINDS = {ours: kind for kind, ours in LAYER_TENSORS.items()}  # the tables read backwards
_GLOBAL_KINDS = {ours: kind for kind, ours in GLOBAL_TENSORS.items()}


def _gguf_name(ours: str) -> tuple[str, str] | None:
    """Our tensor name -> (llama.cpp's name, its layer tensor kind or ""), or None for a name llama.cpp has no row for."""
    m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", ours)
    if m:
        kind = _LAYER_KINDS.get(m.group(2))
        return (f"blk.{m.group(1)}.{kind}.{m.group(3)}", kind) if kind else None
    m = re.match(r"(.+)\.(weight|bias)$", ours)
    kind = _GLOBAL_KINDS.get(m.group(1)) if m else None
    return (f"{kind}.{m.group(2)}", "") if kind and m else None


def _our_name(theirs: str) -> tuple[str, str] | None:
    """llama.cpp's tensor name -> (ours, its layer tensor kind or ""), or None for a name llmkit has no row for."""
    m = re.match(r"blk\.(\d+)\.(\w+)\.(weight|bias)$", theirs)
    if m:
        return (f"blocks.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}", m.group(2)) if m.group(2) in LAYER_TENSORS else None
    m = re.match(r"(\w+)\.(weight|bias)$", theirs)
    return (f"{GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}", "") if m and m.group(1) in GLOBAL_TENSORS else None


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its RoPE; undo it for the `rotate_half` layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our `rotate_half` q/k rows -> llama.cpp's interleaved layout (its converter's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_rope_scaling(g, rope_freqs: torch.Tensor | None, context: int) -> dict | None:
    """A GGUF's RoPE scaling: llama.cpp's `rope_freqs` factors (Llama 3.1), or `rope.scaling.type` linear / yarn."""
    kind = g("rope.scaling.type", "none")
    factor = g("rope.scaling.factor")
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
            "original_max_position_embeddings": g("rope.scaling.original_context_length") or context,
        }
    raise LlmkitError(f"GGUF RoPE scaling {kind!r} is not implemented", "use a GGUF with linear or yarn scaling, rope_freqs, or none")


def _gguf_block_type(reader) -> str | None:
    """The quantization of most of a GGUF's block matrices ("Q4_1", "Q8_0", "F16", ...): what the file's quality is."""
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


def load_gguf(path: str | os.PathLike, dtype=None) -> tuple[torch.nn.Module, object]:
    """A GGUF file of a llama, qwen2 or qwen3 model -> (Decoder with dequantized weights in `dtype` (float32 by default),
    Tokenizer). Each tensor is cast as it is dequantized, so a bf16 load never holds a float32 copy of the model."""
    import gguf

    reader = io.open_gguf(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    name = fields.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(name)
    if arch is None:
        raise LlmkitError(
            f"GGUF architecture {name!r} is not supported",
            f"use a GGUF of one of: {', '.join(GGUF_ARCHITECTURES)} (SmolLM2, Llama, Qwen2.5, Qwen3)",
        )
    g = lambda key, default=None: fields.get(f"{name}.{key}", default)  # noqa: E731
    tokens = fields["tokenizer.ggml.tokens"]
    d, nh = g("embedding_length"), g("attention.head_count")
    # llama.cpp stops on every end-of-generation id: eos, end of turn, end of message
    eos = list(dict.fromkeys(i for i in (fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")) if i is not None))
    names = {t.name for t in reader.tensors}
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        rope_freqs = torch.from_numpy(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).copy())
    context = g("context_length", 2048)
    bias = "blk.0.attn_output.bias" in names
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
        rope_scaling=_gguf_rope_scaling(g, rope_freqs, context),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        norm_position="pre",
        bias=bias,
        qkv_bias=None if ("blk.0.attn_q.bias" in names) == bias else not bias,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        tie_embeddings="output.weight" not in names,
        extra={"source": "gguf", "name": fields.get("general.name"), "gguf_architecture": name},
    )
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads} if arch.interleaved else {}
    ours = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hit = _our_name(t.name)
        if hit is None:
            raise LlmkitError(f"{path} holds a tensor llmkit does not know: {t.name}", f"use a plain {name}-architecture GGUF")
        ours[t.name] = (hit[0], tuple(reversed([int(x) for x in t.shape])), heads.get(hit[1]))
    model = build_model(cfg, empty=True, dtype=dtype)
    check_state_names(model, {name: shape for name, shape, _ in ours.values()}, source=str(path))

    def stream():  # dequantized one tensor at a time, straight into the model
        for t in reader.tensors:
            if t.name not in ours:
                continue
            name, shape, n_heads = ours[t.name]
            array = gguf.quants.dequantize(t.data, t.tensor_type)
            w = (torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)).reshape(shape)
            yield name, _unpermute_qk(w, n_heads) if n_heads else w

    copy_tensors(model, stream())
    # what the file's matrices are stored as (not saved with the config: a fine-tuned copy's weights are off that grid)
    model.gguf_weights = _gguf_block_type(reader)
    blocks = {
        t.name: ours[t.name][::2] for t in reader.tensors if t.name in ours and t.tensor_type.name in BLOCK_KINDS and len(t.shape) == 2
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


# --- out: llama.cpp's files ------------------------------------------------------------------------------------------

QUANTS = ("f32", "f16", "q8_0", "q4_0")  # what `export_gguf` writes the matrices as


def gguf_architecture(cfg: ModelConfig) -> GGUFArchitecture:
    """The llama.cpp architecture that computes `cfg`'s model as llmkit does, or an error naming each setting none
    of them has."""
    problems = []
    if cfg.family != "decoder":
        problems.append(f"a {cfg.family} (llmkit writes decoders)")
    for key, value in {"position": "rope", "activation": "swiglu", "norm": "rmsnorm", "norm_position": "pre"}.items():
        if getattr(cfg, key) != value:
            problems.append(f"{key} {getattr(cfg, key)} (not {value})")
    for key, what in (
        ("logit_softcap", "capped logits"),
        ("scale_embeddings", "embeddings x sqrt(d_model)"),
        ("lm_head_bias", "an LM head bias"),
        ("embedding_norm", "a norm after the embeddings"),
        ("type_vocab_size", "token-type embeddings"),
        ("zero_init", None),
    ):
        if getattr(cfg, key) and what:
            problems.append(f"{key} ({what})")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-12:
        problems.append(f"attn_scale {cfg.attn_scale} (llama.cpp scales by 1/sqrt(head_dim))")
    if (cfg.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope"):
        problems.append(f"{cfg.rope_scaling['rope_type']} RoPE scaling")  # type: ignore[index]
    # the settings of Gemma, Phi-3 and windowed models: llama.cpp's llama / qwen2 / qwen3 graphs have none of them
    for key, what in (
        ("sliding_window", "a sliding window, where llama.cpp's llama and qwen2 attend to the whole context"),
        ("rotary_dim", "partial RoPE"),
        ("attn_softcap", "capped attention scores"),
        ("norm_offset", "Gemma's 1 + weight norms"),
        ("sandwich_norm", "norms after each sublayer"),
        ("rope_local_theta", "a second RoPE base"),
    ):
        if getattr(cfg, key) and not (key == "sliding_window" and cfg.sliding_window >= cfg.max_seq_len):
            problems.append(f"{key} ({what})")
    if cfg.bias:
        problems.append("biases on every projection")
    if cfg.qk_norm and cfg.qkv_bias:
        problems.append("q/k norms and q/k/v biases together")
    if problems:
        raise LlmkitError(
            f"no llama.cpp architecture runs this model as llmkit does: {'; '.join(problems)}",
            "export a Llama- or Qwen-like decoder (RoPE, SwiGLU, RMSNorm), or export as a Hugging Face folder (--format hf)",
        )
    return next(a for a in GGUF_ARCHITECTURES.values() if (a.qk_norm, a.qkv_bias) == (cfg.qk_norm, bool(cfg.qkv_bias)))


def _rope_metadata(w, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """RoPE scaling as llama.cpp reads it: linear and yarn as keys; Llama 3's (and llama.cpp's own factors) as the
    `rope_freqs` tensor of per-frequency divisors. Returns the extra tensors to write."""
    import gguf

    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind in ("llama3", "freq_factors"):
        plain, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        scaled, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling)
        return {"rope_freqs.weight": (plain / scaled).float()}
    return {}


def _tensor_data(t: torch.Tensor, quant: str, kind: str):
    """(numpy data, gguf type or None) of one tensor as written: vectors in f32 (as llama.cpp's converter), matrices
    in `quant`; a matrix whose rows do not split into 32-value blocks falls back to f16, and with q4_0 the embeddings
    and the LM head stay q8_0 (llama.cpp keeps them above 4 bits too)."""
    import gguf

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or quant == "f32":
        return a, None
    if quant == "q4_0" and kind == "":
        quant = "q8_0"
    if quant == "f16" or a.shape[-1] % 32:
        return a.astype("float16"), None
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    return gguf.quants.quantize(a, qtype), qtype


def export_gguf(model: torch.nn.Module, path: str | os.PathLike, tokenizer, *, quant: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a Llama-, Qwen2- or Qwen3-like decoder) and its byte-level BPE `tokenizer` as one GGUF file that
    llama.cpp, llama-cpp-python and Ollama open: metadata as llama.cpp's converter writes it (architecture, context,
    RoPE, tokenizer with its pre-tokenizer name, chat template, special tokens), matrices in `quant` (f32, f16, q8_0,
    q4_0), written atomically."""
    import gguf

    if quant not in QUANTS:
        raise LlmkitError(f"unknown GGUF quantization {quant!r}", f"use one of: {', '.join(QUANTS)}")
    if tokenizer is None:
        raise LlmkitError("a GGUF carries its tokenizer, and this model has none", "export a model saved with its tokenizer")
    cfg = model.config
    arch = gguf_architecture(cfg)
    token_fields = gguf_tokenizer_fields(tokenizer, cfg.vocab_size)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    tensors = {}
    for ours, t in state.items():
        hit = _gguf_name(ours)
        if hit is None:
            raise LlmkitError(
                f"the model holds a tensor no llama.cpp {arch.name} has: {ours}", "export as a Hugging Face folder (--format hf)"
            )
        theirs, kind = hit
        if arch.interleaved and kind in ("attn_q", "attn_k"):
            t = _permute_qk(t, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
        tensors[theirs] = (t, kind)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[quant]
    with io.atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        w.add_name(name or str(cfg.extra.get("name") or Path(path).stem))
        w.add_file_type(gguf.LlamaFileType[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        extra_tensors = _rope_metadata(w, cfg)
        _write_tokenizer(w, token_fields)
        for theirs, (t, kind) in tensors.items():
            data, qtype = _tensor_data(t, quant, kind)
            w.add_tensor(theirs, data, raw_dtype=qtype)
        for theirs, t in extra_tensors.items():
            w.add_tensor(theirs, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def _write_tokenizer(w, f: dict) -> None:
    w.add_tokenizer_model(f["tokenizer.ggml.model"])
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"])
    w.add_token_list(f["tokenizer.ggml.tokens"])
    w.add_token_types(f["tokenizer.ggml.token_type"])
    w.add_token_merges(f["tokenizer.ggml.merges"])
    for key, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unknown_token_id", w.add_unk_token_id),
        ("padding_token_id", w.add_pad_token_id),
    ):
        if f.get(f"tokenizer.ggml.{key}") is not None:
            add(f[f"tokenizer.ggml.{key}"])
    w.add_add_bos_token(bool(f["tokenizer.ggml.add_bos_token"]))
    w.add_add_eos_token(bool(f["tokenizer.ggml.add_eos_token"]))
    if f.get("tokenizer.chat_template"):
        w.add_chat_template(f["tokenizer.chat_template"])
