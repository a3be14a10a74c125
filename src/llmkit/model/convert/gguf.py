"""GGUF files (llama.cpp) in and out, for the architectures llama.cpp calls `llama`, `qwen2`, `qwen3`, `gemma2`,
`gemma3` and `phi3`.

In: the names, RoPE settings and tokenizer read from the file; tensors dequantized by the `gguf` package, and the
Q4_0 / Q4_1 / Q8_0 blocks kept as stored for exact fast decoding. Out (`export_gguf`): written with the `gguf` package
(llama.cpp's own writer), metadata as llama.cpp's converter writes it, matrices in f32, f16, q8_0 or q4_0.

One table serves both ways: llama.cpp's tensor names against ours, and per architecture what makes it differ.

    llama    q/k rows interleaved for llama.cpp's RoPE (its converter permutes them; the reader undoes it)
    qwen2    biases on q, k and v (none on o or the feed-forward); RoPE in the NEOX (rotate_half) layout, as stored
    qwen3    each head's queries and keys RMS-normalized before RoPE (attn_q_norm, attn_k_norm); NEOX layout
    gemma2   Gemma's blocks (norms after each sublayer too, GeGLU, embeddings x sqrt(d), soft-capped attention and
             logits), norms stored as 1 + weight (llama.cpp's converter adds the 1), the head always the embeddings;
             windowed layers by `attention.sliding_window_pattern` (default 2: the even layers)
    gemma3   as gemma2 with q/k norms, no attention cap, a logit cap only where the file has one, a windowed layers'
             RoPE base (`rope.freq_base_swa`, default 10000) and pattern 6 by default; windows only where
             `attention.sliding_window` is set
    phi3     q/k/v in one matrix (attn_qkv) and gate/up in one (ffn_up: gate rows first), partial RoPE
             (`rope.dimension_count`), LongRoPE as `rope_factors_long` / `rope_factors_short` and `rope.scaling.attn_factor`;
             llama.cpp gives Phi-3 no sliding window

What llama.cpp decides without reading the file, and llmkit therefore checks before it writes one: Gemma's attention
scale (1/sqrt(head_dim), or 1/sqrt(d_model / n_heads) for the 27B models, told apart by their layer counts), Gemma 2's
caps (always applied), Phi-3's window (none). LongRoPE: llama.cpp picks the long or short factors once for its
context size; llmkit (as transformers) by each sequence's length.
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
from llmkit.model.convert.hf import row_sizes
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
    "post_attention_norm": "attn_post_norm",  # Gemma: the norms after each sublayer
    "post_ffw_norm": "mlp_post_norm",
}
FUSED = {"attn_qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "ffn_up": ("mlp.gate_proj", "mlp.up_proj")}  # Phi-3's rows
GEMMA_LAYERS = {"gemma2": 2, "gemma3": 6}  # llama.cpp's default window patterns: every n-th layer global (`_pattern`)
# the layer counts llama.cpp reads as the 27B models, whose attention it scales by 1/sqrt(d_model / n_heads)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # general.architecture
    interleaved: bool  # llama.cpp's "normal" RoPE: the converter interleaves q/k rows (llama); False: NEOX, as stored
    qkv_bias: bool = False  # q, k, v have biases (o and the feed-forward none)
    qk_norm: bool = False
    gemma: bool = False  # Gemma's blocks, norms as 1 + weight
    fused: bool = False  # q/k/v and gate/up stored as one matrix each (Phi-3)


GGUF_ARCHITECTURES = {
    a.name: a
    for a in (
        GGUFArchitecture("llama", interleaved=True),
        GGUFArchitecture("qwen2", interleaved=False, qkv_bias=True),
        GGUFArchitecture("qwen3", interleaved=False, qk_norm=True),
        GGUFArchitecture("gemma2", interleaved=False, gemma=True),
        GGUFArchitecture("gemma3", interleaved=False, qk_norm=True, gemma=True),
        GGUFArchitecture("phi3", interleaved=False, fused=True),
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


def _window_flags(g, n_layers: int, default_pattern: int) -> list[bool]:
    """Which layers slide, as llama.cpp reads `attention.sliding_window_pattern`: a number n (layer i slides when
    i % n < n - 1: every n-th layer global) or one flag per layer."""
    pattern = g("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise LlmkitError(
                f"a sliding-window pattern of {len(pattern)} flags for {n_layers} layers", "use a GGUF written by llama.cpp's converter"
            )
        return [bool(x) for x in pattern]
    n = int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(n_layers)]


def _family_settings(arch: GGUFArchitecture, g, cfg_head: dict, names: set, tensors: dict) -> dict:
    """What a GGUF of `arch` sets beyond a Llama's, as llama.cpp runs it: Gemma's blocks, caps, windows, attention
    scale and local RoPE base; Phi-3's partial RoPE and LongRoPE."""
    out: dict = {}
    n_layers, d, nh = cfg_head["n_layers"], cfg_head["d_model"], cfg_head["n_heads"]
    if arch.gemma:
        big = n_layers == GEMMA_27B_LAYERS[arch.name]
        out.update(
            activation="geglu",
            norm_offset=1.0,
            sandwich_norm=True,
            scale_embeddings=True,
            attn_scale=(d / nh) ** -0.5 if big else cfg_head["head_dim"] ** -0.5,
            tie_embeddings=arch.name == "gemma2" or "output.weight" not in names,  # Gemma 2's head is always the embeddings
        )
        if arch.name == "gemma2":
            out.update(logit_softcap=float(g("final_logit_softcapping", 30.0)), attn_softcap=float(g("attn_logit_softcapping", 50.0)))
            window = g("attention.sliding_window", 4096)
        else:
            cap = g("final_logit_softcapping")
            out.update(logit_softcap=float(cap) if cap else None)
            window = g("attention.sliding_window", 0)
        if window:
            flags = _window_flags(g, n_layers, GEMMA_LAYERS[arch.name])
            local = g("rope.freq_base_swa")
            if arch.name == "gemma3":  # its windowed layers: their own base (default 10000), never the global scaling
                local = float(local if local is not None else 10000.0)
            elif local is not None and float(local) == float(g("rope.freq_base", 10000.0)):
                local = None  # Gemma 2's windowed layers: the global RoPE, scaling included, unless the file says otherwise
            if arch.name == "gemma2" and local is not None and g("rope.scaling.type", "none") not in ("none", None):
                raise LlmkitError(
                    "a Gemma 2 GGUF with a windowed layers' RoPE base and RoPE scaling (llama.cpp scales those layers too, "
                    "llmkit's own base would not)",
                    "use a Gemma 2 GGUF without rope.freq_base_swa or without scaling",
                )
            out.update(
                sliding_window=int(window),
                layer_types=None if all(flags) else ["sliding_attention" if f else "full_attention" for f in flags],
                rope_local_theta=float(local) if local is not None else None,
            )
    if arch.fused:
        rot = g("rope.dimension_count")
        if rot and rot != cfg_head["head_dim"]:
            out["rotary_dim"] = int(rot)
        if "long" in tensors:  # LongRoPE: per-frequency divisors beyond / within the original context
            original = g("rope.scaling.original_context_length") or cfg_head["max_seq_len"]
            scaling = {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in tensors["long"]],
                "short_factor": [float(x) for x in tensors["short"]],
                "original_max_position_embeddings": int(original),
                "factor": cfg_head["max_seq_len"] / original,
            }
            if g("rope.scaling.attn_factor") is not None:
                scaling["attention_factor"] = float(g("rope.scaling.attn_factor"))
            out["rope_scaling"] = scaling
    return out


def load_gguf(path: str | os.PathLike, dtype=None) -> tuple[torch.nn.Module, object]:
    """A GGUF file of a llama, qwen2, qwen3, gemma2, gemma3 or phi3 model -> (Decoder with dequantized weights in
    `dtype` (float32 by default), Tokenizer). Each tensor is cast as it is dequantized, so a bf16 load never holds a
    float32 copy of the model."""
    import gguf

    reader = io.open_gguf(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    name = fields.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(name)
    if arch is None:
        raise LlmkitError(
            f"GGUF architecture {name!r} is not supported",
            f"use a GGUF of one of: {', '.join(GGUF_ARCHITECTURES)} (SmolLM2, Llama, Qwen2.5, Qwen3, Gemma 2 and 3, Phi-3 and 4-mini)",
        )
    g = lambda key, default=None: fields.get(f"{name}.{key}", default)  # noqa: E731
    tokens = fields["tokenizer.ggml.tokens"]
    d, nh = g("embedding_length"), g("attention.head_count")
    # llama.cpp stops on every end-of-generation id: eos, end of turn, end of message
    eos = list(dict.fromkeys(i for i in (fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")) if i is not None))
    names = {t.name for t in reader.tensors}
    extra = {}  # the tensors that are settings: Llama 3's rope_freqs, Phi-3's LongRoPE factors
    for t in reader.tensors:
        key = {"rope_freqs.weight": "freqs", "rope_factors_long.weight": "long", "rope_factors_short.weight": "short"}.get(t.name)
        if key:
            extra[key] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).flatten()
    context = g("context_length", 2048)
    bias = "blk.0.attn_output.bias" in names
    head = dict(
        vocab_size=g("vocab_size") or len(tokens),
        d_model=d,
        n_layers=g("block_count"),
        n_heads=nh,
        n_kv_heads=g("attention.head_count_kv") or nh,
        head_dim=g("attention.key_length") or d // nh,
        d_ff=g("feed_forward_length"),
        max_seq_len=context,
    )
    cfg = ModelConfig(
        family="decoder",
        **head,
        position="rope",
        rope_theta=g("rope.freq_base", 10000.0),
        rope_scaling=None if arch.fused else _gguf_rope_scaling(g, extra.get("freqs"), context),
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
    cfg = cfg.replace(**_family_settings(arch, g, head, names, extra))
    ours = _tensor_plan(reader, arch, cfg, str(path))
    model = build_model(cfg, empty=True, dtype=dtype)
    check_state_names(model, {our: shape for parts in ours.values() for our, _, _, _, shape in parts}, source=str(path))

    def stream():  # dequantized one tensor at a time, straight into the model
        for t in reader.tensors:
            if t.name not in ours:
                continue
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise LlmkitError(
                    f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot dequantize",
                    "use a GGUF of F32, F16, BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1 or a K / IQ quantization (e.g. Q4_K_M)",
                ) from None
            w = (torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)).reshape(
                tuple(reversed([int(x) for x in t.shape]))
            )
            if arch.gemma and t.name.endswith("norm.weight"):
                w = w - 1  # llama.cpp's converter stores Gemma's norms as 1 + weight
            for our, first, n, n_heads, _ in ours[t.name]:
                part = w[first : first + n] if len(ours[t.name]) > 1 else w
                yield our, _unpermute_qk(part, n_heads) if n_heads else part

    copy_tensors(model, stream())
    # what the file's matrices are stored as (not saved with the config: a fine-tuned copy's weights are off that grid)
    model.gguf_weights = _gguf_block_type(reader)
    blocks = {
        t.name: [part[:4] for part in ours[t.name]]
        for t in reader.tensors
        if t.name in ours and t.tensor_type.name in BLOCK_KINDS and len(t.shape) == 2
    }
    model.gguf_blocks = GGUFBlocks(path, blocks) if blocks else None  # None: no matrix in blocks llmkit decodes exactly
    return model, tokenizer_from_gguf_fields(fields, str(path))


def _tensor_plan(reader, arch: GGUFArchitecture, cfg: ModelConfig, path: str) -> dict[str, list[tuple]]:
    """Where each of the file's tensors goes: GGUF name -> [(our name, first row, rows, heads whose q/k rows llama.cpp
    interleaved or None, our tensor's shape)], several parts for a matrix stacked by rows (Phi-3's attn_qkv, ffn_up).
    The settings' tensors (RoPE factors) and a tied model's output are left out."""
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads} if arch.interleaved else {}
    rows = row_sizes(cfg)
    plan: dict[str, list[tuple]] = {}
    for t in reader.tensors:
        if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue
        if t.name == "output.weight" and cfg.tie_embeddings:  # Gemma 2: llama.cpp multiplies by the embeddings anyway
            continue
        shape = tuple(reversed([int(x) for x in t.shape]))
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
        if arch.fused and m and m.group(2) in FUSED:
            first, parts = 0, []
            for part in FUSED[m.group(2)]:
                n = rows[part.split(".")[1].removesuffix("_proj")]
                parts.append((f"blocks.{m.group(1)}.{part}.weight", first, n, None, (n, *shape[1:])))
                first += n
            if first != shape[0]:
                raise LlmkitError(
                    f"{path}: {t.name} has {shape[0]} rows, not the {first} its parts need", "use a GGUF written by llama.cpp's converter"
                )
            plan[t.name] = parts
            continue
        hit = _our_name(t.name)
        if hit is None:
            name = cfg.extra.get("gguf_architecture")
            raise LlmkitError(f"{path} holds a tensor llmkit does not know: {t.name}", f"use a plain {name}-architecture GGUF")
        plan[t.name] = [(hit[0], 0, shape[0], heads.get(hit[1]), shape)]
    return plan


BLOCK_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # the blocks llmkit decodes exactly from the file (`quantize.BlockLinear`)


class GGUFBlocks:
    """Where a GGUF model's quantized matrices came from, to read their blocks again exactly as the file holds them
    (`quantize(model, "gguf")`): each tensor's raw bytes, (rows, blocks, bytes per block), rows in our order."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, list[tuple[str, int, int, int | None]]]):
        # GGUF name -> [(our name, first row, rows, heads whose q/k rows llama.cpp interleaved)]: a fused matrix
        # (Phi-3's attn_qkv) is cut into its parts by rows
        self.path, self.tensors = Path(path), tensors

    def read(self) -> dict[str, tuple[str, torch.Tensor]]:
        """our name -> (block kind, uint8 tensor (rows, blocks, bytes per block))."""
        import gguf

        reader = io.open_gguf(self.path)
        out = {}
        for t in reader.tensors:
            if t.name not in self.tensors:
                continue
            kind = t.tensor_type.name
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            raw = torch.from_numpy(t.data.copy()).reshape(t.data.shape[0], -1, size)  # (rows, blocks, bytes)
            for name, first, rows, heads in self.tensors[t.name]:
                part = raw[first : first + rows].contiguous()
                out[name] = (kind, _unpermute_qk(part, heads) if heads else part)
        return out


# --- out: llama.cpp's files ------------------------------------------------------------------------------------------

QUANTS = ("f32", "f16", "q8_0", "q4_0")  # what `export_gguf` writes the matrices as


def _gemma_problems(cfg: ModelConfig, name: str) -> list[str]:
    """What llama.cpp's gemma2 / gemma3 graph would compute differently from `cfg`."""
    problems = []
    big = cfg.n_layers == GEMMA_27B_LAYERS[name]
    scale = (cfg.d_model / cfg.n_heads) ** -0.5 if big else cfg.head_dim**-0.5
    if abs((cfg.attn_scale or cfg.head_dim**-0.5) - scale) > 1e-9:
        told = (
            f"1/sqrt(d_model / n_heads) = 1/sqrt({cfg.d_model // cfg.n_heads}), as for the 27B model (its layer count)"
            if big
            else (f"1/sqrt(head_dim) = 1/sqrt({cfg.head_dim})")
        )
        scalar = (cfg.attn_scale or 1.0) ** -2
        problems.append(f"query_pre_attn_scalar {scalar:g} (attention scaled by 1/sqrt({scalar:g}); llama.cpp's {name} scales by {told})")
    if name == "gemma2":
        if not cfg.tie_embeddings:
            problems.append("an LM head of its own (llama.cpp's gemma2 multiplies by the embeddings)")
        if cfg.logit_softcap is None or cfg.attn_softcap is None:
            problems.append("uncapped logits or attention scores (llama.cpp's gemma2 always caps them)")
    elif cfg.attn_softcap is not None:
        problems.append("capped attention scores (llama.cpp's gemma3 has none)")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") != "linear":
        problems.append(f"{cfg.rope_scaling.get('rope_type')} RoPE scaling (llama.cpp's {name}: linear only)")
    if cfg.rotary_dim is not None:
        problems.append("partial RoPE")
    if cfg.rope_local_theta is not None and cfg.sliding_window is None:
        problems.append("a second RoPE base without windowed layers")
    if name == "gemma3" and cfg.rope_scaling and cfg.sliding_window is not None and cfg.rope_local_theta is None:
        problems.append("RoPE scaling on the windowed layers too (llama.cpp's gemma3 scales only the global ones)")
    if name == "gemma2" and cfg.rope_scaling and cfg.rope_local_theta is not None:
        problems.append("a windowed layers' RoPE base beside RoPE scaling (llama.cpp's gemma2 scales those layers too)")
    if cfg.qkv_bias or cfg.bias:
        problems.append("biases")
    if cfg.qk_norm != (name == "gemma3"):
        problems.append("q/k norms" if cfg.qk_norm else "no q/k norms")
    return problems


def _pattern(cfg: ModelConfig) -> int | list[bool]:
    """`attention.sliding_window_pattern` for cfg's windowed layers: the number n that gives them (layer i slides
    when i % n < n - 1), else one flag per layer."""
    flags = [cfg.windowed(i) for i in range(cfg.n_layers)]
    for n in range(1, cfg.n_layers + 2):
        if flags == [i % n < n - 1 for i in range(cfg.n_layers)]:
            return n
    return flags


def gguf_architecture(cfg: ModelConfig) -> GGUFArchitecture:
    """The llama.cpp architecture that computes `cfg`'s model as llmkit does, or an error naming each setting none
    of them has: Gemma's blocks -> gemma2 (gemma3 with q/k norms), partial RoPE, LongRoPE or a Phi-3 -> phi3, else
    llama, qwen2 or qwen3."""
    problems = []
    if cfg.family != "decoder":
        problems.append(f"a {cfg.family} (llmkit writes decoders)")
    gemma = bool(cfg.norm_offset) and cfg.sandwich_norm and cfg.activation == "geglu" and cfg.scale_embeddings
    if gemma:
        name = "gemma3" if cfg.qk_norm else "gemma2"
        if cfg.position != "rope" or cfg.norm != "rmsnorm" or cfg.norm_position != "pre" or cfg.lm_head_bias or cfg.embedding_norm:
            problems.append("Gemma's blocks with other positions, norms or heads")
        problems += _gemma_problems(cfg, name)
        if problems:
            raise LlmkitError(
                f"llama.cpp's {name} would not run this model as llmkit does: {'; '.join(problems)}",
                "export as a Hugging Face folder (--format hf)",
            )
        return GGUF_ARCHITECTURES[name]
    own_phi3 = "phi3" in (cfg.extra.get("hf_model_type"), cfg.extra.get("gguf_architecture"))
    phi3 = own_phi3 or cfg.rotary_dim is not None or (cfg.rope_scaling or {}).get("rope_type") == "longrope"
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
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "dynamic" or (kind == "longrope" and not phi3) or (phi3 and kind not in (None, "longrope")):
        problems.append(f"{kind} RoPE scaling")
    # the settings of Gemma and windowed models: llama.cpp's llama / qwen2 / qwen3 / phi3 graphs have none of them
    for key, what in (
        ("sliding_window", "a sliding window, where llama.cpp's llama, qwen2 and phi3 attend to the whole context"),
        ("rotary_dim", "partial RoPE"),
        ("attn_softcap", "capped attention scores"),
        ("norm_offset", "Gemma's 1 + weight norms"),
        ("sandwich_norm", "norms after each sublayer"),
        ("rope_local_theta", "a second RoPE base"),
    ):
        if key == "sliding_window" and (own_phi3 or (cfg.sliding_window or 0) >= cfg.max_seq_len):
            continue  # a Phi-3's: llama.cpp drops it, as for its own converter's files (`llama_cpp_notes` says so)
        if key == "rotary_dim" and phi3:
            continue
        if getattr(cfg, key):
            problems.append(f"{key} ({what})")
    if cfg.bias:
        problems.append("biases on every projection")
    if cfg.qk_norm and cfg.qkv_bias:
        problems.append("q/k norms and q/k/v biases together")
    if phi3 and (cfg.qk_norm or cfg.qkv_bias):
        problems.append("q/k norms or biases (llama.cpp's phi3 has neither)")
    if phi3 and cfg.n_heads * cfg.head_dim != cfg.d_model:
        problems.append(
            f"heads of {cfg.head_dim} ({cfg.n_heads} x {cfg.head_dim} != d_model {cfg.d_model}: llama.cpp's phi3 needs them equal)"
        )
    if problems:
        raise LlmkitError(
            f"no llama.cpp architecture runs this model as llmkit does: {'; '.join(problems)}",
            "export a Llama-, Qwen-, Gemma- or Phi-3-like decoder, or export as a Hugging Face folder (--format hf)",
        )
    if phi3:
        return GGUF_ARCHITECTURES["phi3"]
    return next(
        a for a in GGUF_ARCHITECTURES.values() if not (a.gemma or a.fused) and (a.qk_norm, a.qkv_bias) == (cfg.qk_norm, bool(cfg.qkv_bias))
    )


def llama_cpp_notes(cfg: ModelConfig, tokenizer=None) -> list[str]:
    """What llama.cpp will do differently with an export that is still written (said to the user)."""
    arch = gguf_architecture(cfg)
    notes = []
    spec = tokenizer.backend.to_str() if tokenizer is not None else ""
    if '"Metaspace"' in spec and '"prepend_scheme":"first"' in spec.replace(" ", ""):
        notes.append(
            "llama.cpp puts a space before a text that follows a special token, and before one that starts with a space, "
            "where this tokenizer (Llama 2's kind) does not: such texts tokenize differently in llama.cpp (as with its own "
            "converter's files)"
        )
    if arch.name == "phi3" and cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        notes.append(
            f"llama.cpp gives Phi-3 no sliding window: beyond {cfg.sliding_window} tokens it attends further back than this model "
            "(as with Phi-3 GGUFs from llama.cpp's own converter)"
        )
    if arch.name == "phi3" and (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        notes.append("llama.cpp picks LongRoPE's long or short factors once, by its context size (llmkit: by each sequence's length)")
    return notes


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
    elif kind == "longrope":  # Phi-3: the factors as tensors, the original context and cos/sin's scale as keys
        original = int(scaling["original_max_position_embeddings"])
        _, attention = rope_frequencies(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, scaling)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(float(attention))
        return {
            "rope_factors_long.weight": torch.tensor(scaling["long_factor"], dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(scaling["short_factor"], dtype=torch.float32),
        }
    return {}


def _gemma_metadata(w, cfg: ModelConfig, name: str) -> None:
    """Gemma's caps, windows and local RoPE base as llama.cpp reads them (its defaults written out too)."""
    if cfg.logit_softcap is not None:
        w.add_final_logit_softcapping(float(cfg.logit_softcap))
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(float(cfg.attn_softcap))
    if cfg.sliding_window is not None:
        w.add_sliding_window(int(min(cfg.sliding_window, 2**31 - 1)))
        w.add_sliding_window_pattern(_pattern(cfg))
        w.add_rope_freq_base_swa(float(cfg.rope_local_theta or cfg.rope_theta))
    elif name == "gemma2":  # llama.cpp always windows Gemma 2's even layers: a window as long as the context changes nothing
        w.add_sliding_window(int(cfg.max_seq_len))


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
    """Write `model` (a Llama-, Qwen2-, Qwen3-, Gemma 2 / 3- or Phi-3-like decoder) and its byte-level BPE or
    SentencePiece BPE `tokenizer` as one GGUF file that llama.cpp, llama-cpp-python and Ollama open: metadata as
    llama.cpp's converter writes it (architecture, context, RoPE, tokenizer with its pre-tokenizer name or scores,
    chat template, special tokens), matrices in `quant` (f32, f16, q8_0, q4_0), written atomically."""
    import gguf

    if quant not in QUANTS:
        raise LlmkitError(f"unknown GGUF quantization {quant!r}", f"use one of: {', '.join(QUANTS)}")
    if tokenizer is None:
        raise LlmkitError("a GGUF carries its tokenizer, and this model has none", "export a model saved with its tokenizer")
    cfg = model.config
    arch = gguf_architecture(cfg)
    token_fields = gguf_tokenizer_fields(tokenizer, cfg.vocab_size, arch.name)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    tensors = {}
    if arch.fused:  # Phi-3: q/k/v and gate/up as one matrix each, stacked by rows
        for i in range(cfg.n_layers):
            for theirs, parts in FUSED.items():
                names = [f"blocks.{i}.{part}.weight" for part in parts]
                tensors[f"blk.{i}.{theirs}.weight"] = (torch.cat([state.pop(n) for n in names]), theirs)
    for ours, t in state.items():
        hit = _gguf_name(ours)
        if hit is None:
            raise LlmkitError(
                f"the model holds a tensor no llama.cpp {arch.name} has: {ours}", "export as a Hugging Face folder (--format hf)"
            )
        theirs, kind = hit
        if arch.interleaved and kind in ("attn_q", "attn_k"):
            t = _permute_qk(t, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
        if arch.gemma and ours.endswith("norm.weight"):
            t = t.float() + 1  # llama.cpp multiplies by the stored weight: Gemma's 1 + weight, as its converter writes it
        tensors[theirs] = (t, kind)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[quant]
    with io.atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        name = name or str(cfg.extra.get("name") or Path(path).stem)
        vocab = set(token_fields["tokenizer.ggml.tokens"])
        if not vocab >= {"<s>", "</s>", "<unk>", "<|endoftext|>"}:
            # llama.cpp looks these four up by name in any model whose name says Phi-3 (and fails to load without them)
            name = re.sub(r"(?i)phi-?3", "phi", name)
        w.add_name(name)
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
        w.add_rope_dimension_count(cfg.rotary_dim or cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        extra_tensors = _rope_metadata(w, cfg)
        if arch.gemma:
            _gemma_metadata(w, cfg, arch.name)
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
    if "tokenizer.ggml.pre" in f:  # byte-level BPE: how text is split first; its merges
        w.add_tokenizer_pre(f["tokenizer.ggml.pre"])
    w.add_token_list(f["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in f:  # SentencePiece: the merge order
        w.add_token_scores(f["tokenizer.ggml.scores"])
    w.add_token_types(f["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in f:
        w.add_token_merges(f["tokenizer.ggml.merges"])
    if "tokenizer.ggml.add_space_prefix" in f:
        w.add_add_space_prefix(bool(f["tokenizer.ggml.add_space_prefix"]))
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
