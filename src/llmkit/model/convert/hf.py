"""Hugging Face checkpoints in and out, as tables: per architecture one declarative description used in both directions.

    Architecture        model_type, the class written on export, the ModelConfig settings the architecture fixes
                        (`fixed`: imported as they are; a model exports as this architecture only when it has them)
    Field rows          our config field <-> theirs, with a default (a value, or a function of their config) and a
                        value map (their activation names <-> ours)
    Rename rows         their tensor name <-> ours, as templates with named parts: `model.layers.{i}.mlp.{p}_proj.{w}`
                        <-> `blocks.{i}.mlp.{p}_proj.{w}`; `how`: "t" (Conv1D weights are stored transposed) or "qkv"
                        (GPT-2's fused c_attn, split on import and joined on export)

So `config_from_hf`, `hf_config_for`, `to_ours` (state dict in) and `to_theirs` (state dict out) are each one loop over
the tables, and a new family is new rows. What a table cannot say (an architecture's refusals on import, the settings
transformers would silently run differently on export) is a short check beside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model import build_model
from llmkit.model.config import ModelConfig, check_rope_scaling
from llmkit.model.convert.tensors import _safetensors_bytes, _safetensors_keys, _stream_safetensors, check_state_names, copy_tensors

REQUIRED = object()  # a Field with no default: their config must have it


@dataclass(frozen=True)
class Field:
    ours: str
    theirs: str
    default: Any = REQUIRED  # or a function of their whole config
    values: dict | None = None  # their value -> ours (activations); its inverse is used on export
    export: bool = True  # written on export (False: read only, such as a default that transformers derives)
    convert: tuple[Callable, Callable] | None = None  # (theirs -> ours, ours -> theirs) for a value in other units
    null: bool = False  # an explicit null is the value (Gemma 2's soft-caps: null = no cap), not "use the default"

    def read(self, hf: dict):
        if hf.get(self.theirs) is not None or (self.null and self.theirs in hf):
            value = hf[self.theirs]
        elif self.default is REQUIRED:
            raise LlmkitError(f"the config has no {self.theirs!r}", "use the config.json the checkpoint was saved with")
        else:
            value = self.default(hf) if callable(self.default) else self.default
        if self.values is not None:
            if value not in self.values:
                raise LlmkitError(f"{self.theirs} {value!r} is not supported", f"use one of: {', '.join(map(str, self.values))}")
            value = self.values[value]
        return self.convert[0](value) if self.convert is not None and value is not None else value

    def write(self, cfg: ModelConfig):
        value = getattr(cfg, self.ours)
        if self.values is not None:
            inverse = {ours: theirs for theirs, ours in reversed(list(self.values.items()))}  # the first name wins
            value = inverse[value]
        return self.convert[1](value) if self.convert is not None and value is not None else value


@dataclass(frozen=True)
class Rename:
    theirs: str  # a template: literal text and {name} or {name:regex} parts (i: a layer number, w: weight|bias)
    ours: str
    how: str | None = None  # "t": transposed (Conv1D); "qkv": GPT-2's fused c_attn, three of ours ({qkv} part);
    # "rows": one tensor of theirs stacked by rows, ours its parts ({part} names them; sizes from the config: Phi-3's
    # qkv_proj (q, k, v) and gate_up_proj (gate, up))
    export: bool = True  # False: read on import only (a head the exported architecture does not have)
    when: Callable[[ModelConfig], bool] | None = None  # on export, only for configs of this kind (T5's gated wi_1)


PART = {"i": r"\d+", "w": "weight|bias"}


def _pattern(template: str, parts: dict[str, str]) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)(?::([^}]*))?\}", template):
        out += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>{m.group(2) or parts.get(m.group(1), '[^.]+')})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    classes: tuple[str, ...]  # transformers' class names: the first is written on export
    family: str
    fixed: dict  # ModelConfig settings the architecture always has
    fields: tuple[Field, ...]
    renames: tuple[Rename, ...]
    check: Callable[[dict], None] | None = None  # refusals on import (what our ModelConfig cannot express)
    fits: Callable[[ModelConfig], bool] | None = None  # on export, beyond `fixed`: whether a config is of this kind
    exportable: bool = True
    optional_prefix: str = ""  # a prefix their names may lack (BERT's "bert." in a bare BertModel)

    @property
    def position_rope(self) -> bool:
        return self.fixed.get("position") == "rope"

    def _rules(self) -> list[tuple[re.Pattern, re.Pattern, Rename]]:
        rules = []
        for r in self.renames:
            parts = dict(PART)
            for template in (r.theirs, r.ours):
                parts.update({m.group(1): m.group(2) for m in re.finditer(r"\{(\w+):([^}]*)\}", template)})
            parts.setdefault("qkv", "q|k|v")
            parts.setdefault("part", "q|k|v|gate|up")
            rules.append((_pattern(r.theirs, parts), _pattern(r.ours, parts), r))
        return rules


def _rope_params(hf: dict, layer_type: str = "full_attention") -> dict:
    """A config's RoPE parameters: `rope_scaling` (transformers 4) or `rope_parameters` (5), the global layers' in
    Gemma 3's per-layer-type form ({"full_attention": {...}, "sliding_attention": {...}})."""
    raw = hf.get("rope_parameters") or {}
    if layer_type in raw or "full_attention" in raw:
        return dict(raw.get(layer_type) or {})
    return dict(hf.get("rope_scaling") or raw)


def _rope_theta(hf: dict, default: float = 10000.0) -> float:
    return float(hf.get("rope_theta") or _rope_params(hf).get("rope_theta") or default)


def _partial_rotary(hf: dict, head_dim: int) -> int | None:
    """The rotating features of each head (Phi-4-mini's partial_rotary_factor 0.75), None for all of them."""
    factor = hf.get("partial_rotary_factor") or _rope_params(hf).get("partial_rotary_factor") or 1.0
    return None if factor == 1.0 else int(head_dim * factor)


def rope_scaling_from_hf(hf: dict) -> tuple[dict | None, int]:
    """(our rope_scaling, the context it serves) from a Hugging Face config's `rope_scaling` or `rope_parameters`.

    The context is the longest the scaling was made for: max(max_position_embeddings, factor x the original context),
    since some configs (Qwen's yarn) keep the original length in max_position_embeddings."""
    raw = _rope_params(hf)
    kind = raw.get("rope_type") or raw.get("type") or "default"
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind == "default":
        return None, max_pos
    scaling = {k: v for k, v in raw.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):  # transformers: a top-level original_max_position_embeddings wins
        if hf.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_pos)
    if kind == "longrope":  # Phi-3: the factor is the context's growth (its attention scale follows from it)
        if scaling.get("factor") is None:
            scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
        check_rope_scaling(scaling)
        return scaling, max_pos
    if kind == "dynamic":  # dynamic NTK grows beyond max_position_embeddings
        scaling["original_max_position_embeddings"] = max_pos
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    check_rope_scaling(scaling)
    if kind == "linear":  # no original length is recorded: the config's own is the context (an export keeps it)
        return scaling, max_pos
    return scaling, max(max_pos, int(float(scaling["factor"]) * scaling["original_max_position_embeddings"]))


def _check_llama(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise LlmkitError(f"Llama hidden_act {hf['hidden_act']!r} is not supported", "use a Llama with SiLU (SwiGLU) feed-forward")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):  # transformers' defaults: both False
        raise LlmkitError(
            "a Llama config with biases on attention but not on the feed-forward (or the reverse) is not supported",
            "use attention_bias == mlp_bias",
        )


GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _refuse(hf: dict, settings: dict) -> None:
    """A config field that changes the math in a way llmkit does not compute: refused by name, never ignored."""
    for key, ok in settings.items():
        value = hf.get(key)
        if value is not None and not ok(value):
            raise LlmkitError(
                f"{hf.get('model_type')} {key} {value!r} is not implemented (it changes the model's numbers)",
                "use a checkpoint without it, or keep transformers for this model",
            )


def _check_gpt2(hf: dict) -> None:
    _refuse(hf, {"scale_attn_by_inverse_layer_idx": lambda v: not v})  # (reorder_and_upcast_attn only changes precision)
    _refuse(hf, {"scale_attn_weights": lambda v: v})


def _check_bert(hf: dict) -> None:
    _refuse(hf, {"position_embedding_type": lambda v: v == "absolute"})


GPT2 = Architecture(
    "gpt2",
    ("GPT2LMHeadModel",),
    "decoder",
    fixed={"position": "learned", "norm": "layernorm", "norm_position": "pre", "bias": True, "tie_embeddings": True},
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("d_model", "n_embd"),
        Field("n_layers", "n_layer"),
        Field("n_heads", "n_head"),
        Field("d_ff", "n_inner", lambda hf: 4 * hf["n_embd"]),
        Field("max_seq_len", "n_positions"),
        Field("activation", "activation_function", "gelu_new", values=GELUS),
        Field("norm_eps", "layer_norm_epsilon", 1e-5),
        Field("tie_embeddings", "tie_word_embeddings", True),
        Field("bos_token_id", "bos_token_id", None),
        Field("eos_token_id", "eos_token_id", None),
    ),
    renames=(
        Rename("transformer.wte.weight", "embed.tokens.weight"),
        Rename("transformer.wpe.weight", "embed.position.weight"),
        Rename("transformer.h.{i}.ln_1.{w}", "blocks.{i}.attn_norm.{w}"),
        Rename("transformer.h.{i}.attn.c_attn.{w}", "blocks.{i}.attn.{qkv}_proj.{w}", "qkv"),
        Rename("transformer.h.{i}.attn.c_proj.weight", "blocks.{i}.attn.o_proj.weight", "t"),
        Rename("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attn.o_proj.bias"),
        Rename("transformer.h.{i}.ln_2.{w}", "blocks.{i}.mlp_norm.{w}"),
        Rename("transformer.h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up_proj.weight", "t"),
        Rename("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up_proj.bias"),
        Rename("transformer.h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down_proj.weight", "t"),
        Rename("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down_proj.bias"),
        Rename("transformer.ln_f.{w}", "norm.{w}"),
        Rename("lm_head.weight", "lm_head.weight"),
    ),
    check=_check_gpt2,
    fits=lambda cfg: cfg.n_kv_heads == cfg.n_heads and cfg.activation in ("gelu_tanh", "gelu", "relu"),
)

LLAMA = Architecture(
    "llama",
    ("LlamaForCausalLM",),
    "decoder",
    fixed={"position": "rope", "activation": "swiglu", "norm": "rmsnorm", "norm_position": "pre"},
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("d_model", "hidden_size"),
        Field("n_layers", "num_hidden_layers"),
        Field("n_heads", "num_attention_heads"),
        Field("n_kv_heads", "num_key_value_heads", lambda hf: hf["num_attention_heads"]),
        Field("head_dim", "head_dim", lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
        Field("d_ff", "intermediate_size"),
        Field("max_seq_len", "max_position_embeddings", 2048),
        Field("rope_theta", "rope_theta", 10000.0),
        Field("norm_eps", "rms_norm_eps", 1e-6),
        Field("bias", "attention_bias", False),
        Field("bias", "mlp_bias", False),
        Field("tie_embeddings", "tie_word_embeddings", False),
        Field("bos_token_id", "bos_token_id", None),
        Field("eos_token_id", "eos_token_id", None),
    ),
    renames=(
        Rename("model.embed_tokens.weight", "embed.tokens.weight"),
        Rename("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        Rename("model.layers.{i}.self_attn.{p:[qkvo]}_proj.{w}", "blocks.{i}.attn.{p}_proj.{w}"),
        Rename("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        Rename("model.layers.{i}.mlp.{p:gate|up|down}_proj.{w}", "blocks.{i}.mlp.{p}_proj.{w}"),
        Rename("model.norm.weight", "norm.weight"),
        Rename("lm_head.weight", "lm_head.weight"),
    ),
    check=_check_llama,
    # Llama's biases are all or none; queries and keys without norms (Qwen2 and Qwen3 export as themselves); no window
    fits=lambda cfg: cfg.qkv_bias in (None, cfg.bias) and not cfg.qk_norm and cfg.sliding_window is None,
)


def _llama_like(model_type: str, cls: str, *, fixed: dict, fields: tuple, renames: tuple, check, fits) -> Architecture:
    """A family that is Llama's layout with a few rows changed: its fields and tensor names start from Llama's."""
    replaced = {(f.ours, f.theirs) for f in fields}
    base = tuple(f for f in LLAMA.fields if f.theirs not in ("attention_bias", "mlp_bias") and (f.ours, f.theirs) not in replaced)
    return Architecture(
        model_type, (cls,), "decoder", {**LLAMA.fixed, **fixed}, base + fields, LLAMA.renames + renames, check=check, fits=fits
    )


def _check_qwen(hf: dict) -> None:
    _check_llama({**hf, "attention_bias": False, "mlp_bias": False})
    if hf.get("attention_bias"):  # Qwen3: biases on q, k, v and o but none in the feed-forward: not one of our settings
        raise LlmkitError("a Qwen3 config with attention_bias true is not supported", "use a Qwen3 without attention biases")


QWEN2 = _llama_like(
    "qwen2",
    "Qwen2ForCausalLM",
    fixed={"bias": False, "qkv_bias": True},  # q, k, v with biases; o and the feed-forward without
    fields=(),
    renames=(),
    check=_check_qwen,
    fits=lambda cfg: cfg.qkv_bias is True and not cfg.bias and not cfg.qk_norm,
)
QWEN3 = _llama_like(
    "qwen3",
    "Qwen3ForCausalLM",
    fixed={"bias": False, "qk_norm": True},  # each head's queries and keys RMS-normalized before RoPE
    fields=(),
    renames=(Rename("model.layers.{i}.self_attn.{p:q|k}_norm.weight", "blocks.{i}.attn.{p}_norm.weight"),),
    check=_check_qwen,
    fits=lambda cfg: cfg.qk_norm and not cfg.bias and cfg.qkv_bias in (None, False),
)
MISTRAL = _llama_like(
    "mistral",
    "MistralForCausalLM",
    fixed={"bias": False},
    fields=(),
    renames=(),
    check=_check_qwen,
    # every layer windowed (a Mistral without a window is a Llama: exported as one)
    fits=lambda cfg: cfg.sliding_window is not None and cfg.layer_types is None and not cfg.qk_norm and cfg.qkv_bias in (None, False),
)


def _check_gemma(hf: dict) -> None:
    _refuse(hf, {"attention_bias": lambda v: not v, "use_bidirectional_attention": lambda v: not v})


def _scalar_scale(v) -> float:  # query_pre_attn_scalar -> the attention scale
    return float(v) ** -0.5


def _scale_scalar(scale: float):  # the attention scale -> query_pre_attn_scalar (an integer where it was one)
    v = scale**-2
    return int(round(v)) if abs(v - round(v)) < 1e-6 else v


_GEMMA_FIELDS = (
    Field("vocab_size", "vocab_size"),
    Field("d_model", "hidden_size"),
    Field("n_layers", "num_hidden_layers"),
    Field("n_heads", "num_attention_heads"),
    Field("n_kv_heads", "num_key_value_heads", lambda hf: hf["num_attention_heads"]),
    Field("head_dim", "head_dim", 256),
    Field("d_ff", "intermediate_size"),
    Field("norm_eps", "rms_norm_eps", 1e-6),
    Field("attn_scale", "query_pre_attn_scalar", 256, convert=(_scalar_scale, _scale_scalar)),
    Field("activation", "hidden_activation", "gelu_pytorch_tanh", values={"gelu_pytorch_tanh": "geglu"}),
    Field("tie_embeddings", "tie_word_embeddings", True),
    Field("pad_token_id", "pad_token_id", 0),
    Field("bos_token_id", "bos_token_id", None),
    Field("eos_token_id", "eos_token_id", None),
)
_GEMMA_RENAMES = (
    Rename("model.embed_tokens.weight", "embed.tokens.weight"),
    Rename("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
    Rename("model.layers.{i}.self_attn.{p:[qkvo]}_proj.weight", "blocks.{i}.attn.{p}_proj.weight"),
    Rename("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.attn_post_norm.weight"),
    Rename("model.layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    Rename("model.layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.mlp_post_norm.weight"),
    Rename("model.layers.{i}.mlp.{p:gate|up|down}_proj.weight", "blocks.{i}.mlp.{p}_proj.weight"),
    Rename("model.norm.weight", "norm.weight"),
    Rename("lm_head.weight", "lm_head.weight"),
)
# Gemma: RMSNorm x (1 + weight), embeddings x sqrt(d), GeGLU (tanh GELU), attention scaled by query_pre_attn_scalar^-0.5,
# a norm after each sublayer as well as before it, windowed layers alternating with global ones
_GEMMA_FIXED = {
    "position": "rope",
    "activation": "geglu",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "bias": False,
    "norm_offset": 1.0,
    "sandwich_norm": True,
    "scale_embeddings": True,
}
GEMMA2 = Architecture(
    "gemma2",
    ("Gemma2ForCausalLM",),
    "decoder",
    fixed={**_GEMMA_FIXED, "qk_norm": False},
    fields=(
        *_GEMMA_FIELDS,
        Field("max_seq_len", "max_position_embeddings", 8192),
        Field("logit_softcap", "final_logit_softcapping", 30.0, null=True),  # transformers' defaults: capped unless null
        Field("attn_softcap", "attn_logit_softcapping", 50.0, null=True),
        Field("rope_theta", "rope_theta", 10000.0),
    ),
    renames=_GEMMA_RENAMES,
    check=_check_gemma,
    fits=lambda cfg: cfg.rope_local_theta is None,
)
GEMMA3 = Architecture(
    "gemma3_text",
    ("Gemma3ForCausalLM",),
    "decoder",
    fixed={**_GEMMA_FIXED, "qk_norm": True},  # and each head's queries and keys normalized (the same 1 + weight form)
    fields=(
        *_GEMMA_FIELDS,
        Field("max_seq_len", "max_position_embeddings", 131072),
        Field("logit_softcap", "final_logit_softcapping", None),
        Field("attn_softcap", "attn_logit_softcapping", None),
        Field("rope_theta", "rope_theta", lambda hf: _rope_params(hf).get("rope_theta") or 1_000_000.0),  # Gemma 3's default
        # the windowed layers' RoPE base (their rope_parameters["sliding_attention"] in transformers 5)
        Field("rope_local_theta", "rope_local_base_freq", lambda hf: _rope_params(hf, "sliding_attention").get("rope_theta", 10000.0)),
    ),
    renames=(*_GEMMA_RENAMES, Rename("model.layers.{i}.self_attn.{p:q|k}_norm.weight", "blocks.{i}.attn.{p}_norm.weight")),
    check=_check_gemma,
)


def _check_phi3(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise LlmkitError(f"Phi-3 hidden_act {hf['hidden_act']!r} is not supported", "use a Phi-3 with SiLU (SwiGLU) feed-forward")


PHI3 = Architecture(
    "phi3",
    ("Phi3ForCausalLM",),
    "decoder",
    fixed={**LLAMA.fixed, "bias": False},
    fields=(
        *(f for f in LLAMA.fields if f.theirs not in ("attention_bias", "mlp_bias")),
        Field("pad_token_id", "pad_token_id", 0),  # written back: transformers' default (32000) is outside small vocabularies
    ),
    renames=(
        Rename("model.embed_tokens.weight", "embed.tokens.weight"),
        Rename("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        Rename("model.layers.{i}.self_attn.qkv_proj.weight", "blocks.{i}.attn.{part:q|k|v}_proj.weight", "rows"),  # q, k, v stacked
        Rename("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o_proj.weight"),
        Rename("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        Rename("model.layers.{i}.mlp.gate_up_proj.weight", "blocks.{i}.mlp.{part:gate|up}_proj.weight", "rows"),  # gate, then up
        Rename("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down_proj.weight"),
        Rename("model.norm.weight", "norm.weight"),
        Rename("lm_head.weight", "lm_head.weight"),
    ),
    check=_check_phi3,
    # Phi-3 is Llama with fused projections (after Llama and Mistral in ARCHITECTURES: only a Phi-3's own config, or
    # what they cannot hold (partial RoPE, LongRoPE), exports as Phi-3)
    fits=lambda cfg: not cfg.qk_norm and cfg.qkv_bias in (None, False) and cfg.layer_types is None,
)


def row_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The rows of each part of a tensor stacked by rows (Phi-3's qkv_proj and gate_up_proj)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": q, "k": kv, "v": kv, "gate": cfg.d_ff, "up": cfg.d_ff}


DEFAULT_WINDOW = {"gemma2": 4096, "gemma3_text": 4096, "mistral": 4096}  # transformers' when config.json has no key


def sliding_layers(hf: dict) -> tuple[int | None, list[str] | None]:
    """(the window of a config's sliding-window layers, which layers slide: None for all), or (None, None) when every
    layer attends to the whole context. `layer_types` when given (transformers 5); else by family: Qwen's
    `use_sliding_window` from `max_window_layers` on, Gemma 2 every other layer from the first, Gemma 3 all but every
    `sliding_window_pattern`-th, Mistral and Phi-3 all."""
    kind = hf.get("model_type")
    n = hf.get("num_hidden_layers", 0)
    window = hf.get("sliding_window", DEFAULT_WINDOW.get(kind))
    if not window and kind in ("gemma2", "gemma3_text"):
        # no window, yet the "sliding" layers stay apart (Gemma 3's take the local RoPE base): a window as long as the
        # context masks nothing
        window = hf.get("max_position_embeddings") or 131072
    if not window:
        return None, None
    types = hf.get("layer_types")
    if types is None:
        if kind in ("qwen2", "qwen3"):
            if not hf.get("use_sliding_window"):
                return None, None
            first = hf.get("max_window_layers", n)
            types = ["full_attention" if i < first else "sliding_attention" for i in range(n)]
        elif kind == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        elif kind == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if types is not None and "sliding_attention" not in types:
        return None, None
    return int(window), (None if types is None or all(t == "sliding_attention" for t in types) else list(types))


BERT = Architecture(
    "bert",
    ("BertForMaskedLM",),
    "encoder",
    fixed={
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "post",
        "bias": True,
        "embedding_norm": True,
        "lm_head_bias": True,
        "mlm_transform": True,
    },
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("d_model", "hidden_size"),
        Field("n_layers", "num_hidden_layers"),
        Field("n_heads", "num_attention_heads"),
        Field("d_ff", "intermediate_size"),
        Field("activation", "hidden_act", "gelu", values={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}),
        Field("max_seq_len", "max_position_embeddings"),
        Field("type_vocab_size", "type_vocab_size", 2),
        Field("norm_eps", "layer_norm_eps", 1e-12),
        Field("pad_token_id", "pad_token_id", 0),
        Field("tie_embeddings", "tie_word_embeddings", True),
    ),
    renames=(
        Rename("bert.embeddings.word_embeddings.weight", "embed.tokens.weight"),
        Rename("bert.embeddings.position_embeddings.weight", "embed.position.weight"),
        Rename("bert.embeddings.token_type_embeddings.weight", "embed.token_type.weight"),
        Rename("bert.embeddings.LayerNorm.{w}", "embed.norm.{w}"),
        Rename("bert.encoder.layer.{i}.attention.self.query.{w}", "blocks.{i}.attn.q_proj.{w}"),
        Rename("bert.encoder.layer.{i}.attention.self.key.{w}", "blocks.{i}.attn.k_proj.{w}"),
        Rename("bert.encoder.layer.{i}.attention.self.value.{w}", "blocks.{i}.attn.v_proj.{w}"),
        Rename("bert.encoder.layer.{i}.attention.output.dense.{w}", "blocks.{i}.attn.o_proj.{w}"),
        Rename("bert.encoder.layer.{i}.attention.output.LayerNorm.{w}", "blocks.{i}.attn_norm.{w}"),
        Rename("bert.encoder.layer.{i}.intermediate.dense.{w}", "blocks.{i}.mlp.up_proj.{w}"),
        Rename("bert.encoder.layer.{i}.output.dense.{w}", "blocks.{i}.mlp.down_proj.{w}"),
        Rename("bert.encoder.layer.{i}.output.LayerNorm.{w}", "blocks.{i}.mlp_norm.{w}"),
        Rename("bert.pooler.dense.{w}", "pooler.0.{w}"),
        Rename("cls.predictions.transform.dense.{w}", "mlm_transform.0.{w}"),
        Rename("cls.predictions.transform.LayerNorm.{w}", "mlm_transform.2.{w}"),
        Rename("cls.predictions.decoder.weight", "lm_head.weight"),
        Rename("cls.predictions.bias", "lm_head.bias"),
        Rename("cls.predictions.decoder.bias", "lm_head.bias", export=False),
        Rename("classifier.{w}", "classifier.1.{w}", export=False),  # BertForSequenceClassification's head: read only
    ),
    check=_check_bert,
    optional_prefix="bert.",
    # gated activations match too, so that the export names them as what transformers' BERT would run differently
    fits=lambda cfg: cfg.type_vocab_size > 0 and cfg.activation in ("gelu", "gelu_tanh", "relu", "swiglu", "geglu"),
)


def _t5_check(hf: dict) -> None:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise LlmkitError(f"T5 feed_forward_proj {proj!r} is not supported", "use a T5 with relu or gated-gelu feed-forward")


T5 = Architecture(
    "t5",
    ("T5ForConditionalGeneration",),
    "encoder-decoder",
    fixed={
        "position": "relative",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "bias": False,
        "attn_scale": 1.0,
        "fp16_clamp": True,
    },
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("d_model", "d_model"),
        Field("n_layers", "num_layers"),
        Field("n_decoder_layers", "num_decoder_layers", lambda hf: hf["num_layers"]),
        Field("n_heads", "num_heads"),
        Field("head_dim", "d_kv"),
        Field("d_ff", "d_ff"),
        Field("max_seq_len", "n_positions", 512),
        Field("relative_buckets", "relative_attention_num_buckets", 32),
        Field("relative_max_distance", "relative_attention_max_distance", 128),
        Field("activation", "feed_forward_proj", "relu", values={"relu": "relu", "gated-gelu": "geglu"}),
        Field("norm_eps", "layer_norm_epsilon", 1e-6),
        Field("tie_embeddings", "tie_word_embeddings", True),
        # transformers scales the decoder's output by d_model^-0.5 exactly when the embeddings are tied (t5, not v1.1)
        Field("scale_decoder_outputs", "scale_decoder_outputs", lambda hf: hf.get("tie_word_embeddings", True), export=False),
        Field("pad_token_id", "pad_token_id", 0),
        Field("eos_token_id", "eos_token_id", None),
        Field("decoder_start_token_id", "decoder_start_token_id", 0),
    ),
    renames=(
        Rename("{e:shared|encoder\\.embed_tokens|decoder\\.embed_tokens}.weight", "enc_embed.tokens.weight", export=False),
        Rename("shared.weight", "enc_embed.tokens.weight"),  # written once: transformers ties the two embed_tokens to it
        Rename("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc_bias.embedding.weight"),
        Rename("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "dec_bias.embedding.weight"),
        Rename("encoder.block.{i}.layer.0.SelfAttention.{p:[qkvo]}.weight", "encoder.{i}.attn.{p}_proj.weight"),
        Rename("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.{i}.attn_norm.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "encoder.{i}.mlp.up_proj.weight", when=lambda c: not c.gated),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "encoder.{i}.mlp.gate_proj.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "encoder.{i}.mlp.up_proj.weight", when=lambda c: c.gated),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "encoder.{i}.mlp.down_proj.weight"),
        Rename("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.{i}.mlp_norm.weight"),
        Rename("encoder.final_layer_norm.weight", "enc_norm.weight"),
        Rename("decoder.block.{i}.layer.0.SelfAttention.{p:[qkvo]}.weight", "decoder.{i}.attn.{p}_proj.weight"),
        Rename("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.{i}.attn_norm.weight"),
        Rename("decoder.block.{i}.layer.1.EncDecAttention.{p:[qkvo]}.weight", "decoder.{i}.cross_attn.{p}_proj.weight"),
        Rename("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.{i}.cross_norm.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi.weight", "decoder.{i}.mlp.up_proj.weight", when=lambda c: not c.gated),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi_0.weight", "decoder.{i}.mlp.gate_proj.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi_1.weight", "decoder.{i}.mlp.up_proj.weight", when=lambda c: c.gated),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wo.weight", "decoder.{i}.mlp.down_proj.weight"),
        Rename("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.{i}.mlp_norm.weight"),
        Rename("decoder.final_layer_norm.weight", "dec_norm.weight"),
        Rename("lm_head.weight", "lm_head.weight"),
    ),
    check=_t5_check,
    # a scaled decoder output comes with tied embeddings in transformers: scaled and untied has no T5 config
    fits=lambda cfg: (cfg.tie_embeddings or not cfg.scale_decoder_outputs) and cfg.activation in ("relu", "geglu"),
)

ARCHITECTURES = {a.model_type: a for a in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA2, GEMMA3, PHI3, BERT, T5)}


def architecture(model_type: str | None) -> Architecture:
    arch = ARCHITECTURES.get(model_type or "")
    if model_type == "gemma3":  # the multimodal checkpoint (Gemma 3 4B and up): its language model is a gemma3_text
        raise LlmkitError(
            "Hugging Face model type 'gemma3' (Gemma 3 with its vision tower) is not supported",
            "use a text-only Gemma 3 (model_type gemma3_text: Gemma 3 270M and 1B)",
        )
    if arch is None:
        names = ", ".join(ARCHITECTURES)
        raise LlmkitError(f"Hugging Face model type {model_type!r} is not supported", f"use a checkpoint of one of these types: {names}")
    return arch


# --- configs ---------------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig of a Hugging Face config.json: the architecture's fixed settings, then its field rows."""
    arch = architecture(hf.get("model_type"))
    if arch.check is not None:
        arch.check(hf)
    values: dict[str, Any] = {"family": arch.family, **arch.fixed}
    for f in arch.fields:
        values[f.ours] = f.read(hf)
    extra: dict[str, Any] = {"hf_model_type": arch.model_type}
    if arch.position_rope:  # RoPE's base may sit in rope_parameters; its scaling sets the context too
        values["rope_theta"] = _rope_theta(hf, values.get("rope_theta", 10000.0))
        values["rope_scaling"], values["max_seq_len"] = rope_scaling_from_hf(hf)
        values["rotary_dim"] = _partial_rotary(hf, values.get("head_dim") or values["d_model"] // values["n_heads"])
    # windowed layers attend to the last `sliding_window` positions in every path (full forward, KV cache, compiled
    # step, the engine's rows, beam search): a mask by column distance, each row's tokens being contiguous
    values["sliding_window"], values["layer_types"] = sliding_layers(hf)
    return ModelConfig(**values, extra=extra)


def _export_blockers(cfg: ModelConfig, arch: str) -> list[str]:
    """Settings of `cfg` that the Hugging Face architecture `arch` would silently run differently."""
    out = []
    if cfg.scale_embeddings and arch not in ("gemma2", "gemma3_text"):
        out.append("scale_embeddings (token embeddings x sqrt(d_model))")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-12 and arch not in ("gemma2", "gemma3_text", "t5"):
        out.append(f"attn_scale {cfg.attn_scale} (transformers scales by 1/sqrt(head_dim))")
    if cfg.embedding_norm and arch != "bert":
        out.append("embedding_norm")
    if cfg.type_vocab_size and arch != "bert":
        out.append("type_vocab_size")
    if arch in ("gpt2", "llama") and cfg.lm_head_bias:
        out.append("lm_head_bias")
    if arch in ("gpt2", "bert") and cfg.head_dim * cfg.n_heads != cfg.d_model:
        out.append(f"head_dim {cfg.head_dim} (transformers' {arch} uses d_model / n_heads = {cfg.d_model // cfg.n_heads})")
    if arch == "bert" and cfg.activation not in ("gelu", "gelu_tanh", "relu"):
        out.append(f"activation {cfg.activation} (BERT's feed-forward is not gated)")
    if arch in ("gpt2", "bert") and cfg.n_kv_heads != cfg.n_heads:
        out.append(f"grouped-query attention ({cfg.n_kv_heads} key/value heads for {cfg.n_heads})")
    if arch == "llama" and (cfg.rope_scaling or {}).get("rope_type") == "freq_factors":
        out.append("llama.cpp rope_freqs factors (no rope_scaling of transformers holds them)")
    gemma = arch in ("gemma2", "gemma3_text")
    if cfg.qk_norm and arch not in ("qwen3", "gemma3_text"):
        out.append(f"qk_norm (transformers' {arch} does not normalize queries and keys)")
    if cfg.logit_softcap is not None and not gemma:
        out.append(f"logit_softcap {cfg.logit_softcap} (transformers' {arch} does not cap logits)")
    if cfg.attn_softcap is not None and not gemma:
        out.append(f"attn_softcap {cfg.attn_softcap} (transformers' {arch} does not cap attention scores)")
    if cfg.norm_offset and not gemma:
        out.append("norm_offset (RMSNorm's 1 + weight form is Gemma's)")
    if cfg.sandwich_norm and not gemma:
        out.append("sandwich_norm (norms after each sublayer are Gemma's)")
    if cfg.sliding_window is not None and arch not in ("mistral", "qwen2", "gemma2", "gemma3_text", "phi3"):
        out.append(f"sliding_window {cfg.sliding_window} (transformers' {arch} attends to the whole context)")
    if cfg.layer_types is not None and arch in ("mistral", "phi3"):
        out.append(f"layer_types (transformers' {arch} windows every layer)")
    if cfg.rotary_dim is not None and arch != "phi3":
        out.append(f"rotary_dim {cfg.rotary_dim} (partial RoPE is Phi-3's)")
    if cfg.rope_local_theta is not None and arch != "gemma3_text":
        out.append(f"rope_local_theta {cfg.rope_local_theta} (a second RoPE base for windowed layers is Gemma 3's)")
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope" and arch != "phi3":
        out.append("longrope RoPE scaling (Phi-3's)")
    return out


def _fits(arch: Architecture, cfg: ModelConfig, mlm_head: bool) -> bool:
    """Whether `cfg` has every setting `arch` fixes (a bare BERT encoder: all but its MLM head's) and is of its kind."""
    fixed = dict(arch.fixed)
    if arch is BERT and not mlm_head:
        fixed = {k: v for k, v in fixed.items() if k not in ("mlm_transform", "lm_head_bias")}
    if cfg.family != arch.family or any(getattr(cfg, k) != v for k, v in fixed.items()):
        return False
    return arch.fits is None or arch.fits(cfg)


def hf_config_for(cfg: ModelConfig, *, mlm_head: bool = True) -> dict:
    """The Hugging Face config.json that describes our model, or an error naming what has no HF equivalent. A model
    read from a Hugging Face folder exports as its own architecture when that one holds it (a Phi-3 stays a Phi-3)."""
    own = ARCHITECTURES.get(cfg.extra.get("hf_model_type") or "")
    candidates = [a for a in ARCHITECTURES.values() if a.exportable and _fits(a, cfg, mlm_head)]
    if own in candidates:
        candidates.remove(own)
        candidates.insert(0, own)
    if not candidates:
        raise LlmkitError(
            f"no Hugging Face architecture matches this {cfg.family} ({cfg.position} positions, {cfg.norm} {cfg.norm_position}-norm, "
            f"{cfg.activation})",
            "export GPT-2-, Llama-, Qwen-, Gemma- or Phi-3-like decoders, BERT-like encoders and T5s, or keep llmkit's own format",
        )
    # the first that holds every setting; none: the first one's objections, named
    arch = next((a for a in candidates if not _export_blockers(cfg, a.model_type)), None)
    if arch is None:
        raise LlmkitError(
            f"transformers' {candidates[0].model_type} would run this model differently: "
            + "; ".join(_export_blockers(cfg, candidates[0].model_type)),
            "keep llmkit's own format (llmkit.load reads it), or train without these settings",
        )
    out: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.classes[0]]}
    for f in arch.fields:
        if f.export:
            out[f.theirs] = f.write(cfg)
    if arch.position_rope:
        if cfg.activation == "swiglu":
            out["hidden_act"] = "silu"
        scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
        if scaling["rope_type"] == "dynamic":  # transformers' dynamic NTK starts growing at max_position_embeddings
            out["max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        if scaling["rope_type"] == "longrope":  # Phi-3 keeps the original context beside the scaling too
            out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        if cfg.rotary_dim is not None:
            out["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
            scaling["partial_rotary_factor"] = out["partial_rotary_factor"]
        parameters = {**scaling, "rope_theta": cfg.rope_theta}
        out["rope_theta"] = cfg.rope_theta
        if cfg.rope_scaling or cfg.rotary_dim is not None:
            out["rope_scaling"] = parameters
        if arch is GEMMA3:  # transformers 5: one set per layer type (the windowed layers' unscaled); 4: the keys above
            out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
            local = {"rope_type": "default", "rope_theta": out["rope_local_base_freq"]}
            out["rope_parameters"] = {"full_attention": parameters, "sliding_attention": local}
        types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window is not None else "full_attention"] * cfg.n_layers
        if arch in (GEMMA2, GEMMA3):  # always written: transformers' defaults (a 4,096 window) would differ
            out["sliding_window"], out["layer_types"] = cfg.sliding_window, types
        elif cfg.sliding_window is not None:
            out["sliding_window"] = cfg.sliding_window
            if arch is QWEN2:
                out["layer_types"] = types
                first = types.index("sliding_attention")
                if all(t == "sliding_attention" for t in types[first:]):  # transformers 4: windowed from max_window_layers on
                    out["use_sliding_window"], out["max_window_layers"] = True, first
        if arch in (GEMMA2, GEMMA3) and out.get("query_pre_attn_scalar") is None:
            out["query_pre_attn_scalar"] = cfg.head_dim  # the default scale, 1/sqrt(head_dim)
    elif arch is GPT2:
        out.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch is BERT:
        out.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    elif arch is T5:
        # transformers scales the decoder's output exactly when tie_word_embeddings is true (transformers 5 always ties
        # and keeps the flag as scale_decoder_outputs): the flag says the scaling, and an unscaled model's head is
        # written out even when tied (transformers 4 then reads it, 5 ties it: the same values)
        out.update(is_encoder_decoder=True, dropout_rate=0.0, tie_word_embeddings=cfg.scale_decoder_outputs)
    return out


# --- tensor names ----------------------------------------------------------------------------------------------------


def to_ours(model_type: str, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict renamed into ours (split / transposed where the layout differs; `cfg` sizes the parts
    of tensors stacked by rows); names no row knows are left out."""
    arch = architecture(model_type)
    rules = arch._rules()
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        for candidate in (name, arch.optional_prefix + name) if arch.optional_prefix else (name,):
            hit = next(((m, r) for theirs, _, r in rules if (m := theirs.match(candidate))), None)
            if hit is not None:
                break
        if hit is None:
            continue
        m, rule = hit
        parts = m.groupdict()
        if rule.how == "qkv":  # GPT-2's fused c_attn: a (D, 3D) Conv1D weight or (3D,) bias -> q, k, v
            for letter, part in zip("qkv", tensor.chunk(3, dim=-1)):
                ours[_fill(rule.ours, {**parts, "qkv": letter})] = part.t().contiguous() if part.dim() == 2 else part.contiguous()
        elif rule.how == "rows":  # Phi-3's qkv_proj / gate_up_proj: the parts stacked by rows, in the template's order
            names = _row_parts(rule)
            for n, piece in zip(names, tensor.split([row_sizes(cfg)[n] for n in names], dim=0)):
                ours[_fill(rule.ours, {**parts, "part": n})] = piece.contiguous()
        else:
            ours[_fill(rule.ours, parts)] = tensor.t().contiguous() if rule.how == "t" else tensor
    return ours


def _row_parts(rule: Rename) -> list[str]:
    """The part names of a "rows" rule, in their stacking order ("{part:q|k|v}" -> ["q", "k", "v"])."""
    m = re.search(r"\{part:([^}]*)\}", rule.ours)
    assert m is not None, rule
    return m.group(1).split("|")


def hf_name(model_type: str, name: str) -> str | None:
    """Our tensor name -> theirs (one-to-one renames only: None for fused tensors (GPT-2's c_attn, Phi-3's qkv_proj
    and gate_up_proj) and for unknown names)."""
    for _, ours, rule in architecture(model_type)._rules():
        m = ours.match(name)
        if m and rule.how not in ("qkv", "rows") and rule.export:
            return _fill(rule.theirs, m.groupdict())
    return None


def fused_name(model_type: str, name: str) -> str | None:
    """The architecture's tensor that holds our tensor `name` together with others (GPT-2's c_attn, Phi-3's qkv_proj
    and gate_up_proj), or None where it is stored alone."""
    for _, ours, rule in architecture(model_type)._rules():
        m = ours.match(name)
        if m and rule.how in ("qkv", "rows"):
            return _fill(rule.theirs, m.groupdict())
    return None


def fused_rows(model_type: str, cfg: ModelConfig, name: str) -> tuple[str, list[tuple[str, int]]] | None:
    """For our tensor `name` stored stacked by rows with others (Phi-3's qkv_proj, gate_up_proj): (their tensor's
    name, [(each part's name of ours, its rows)] in stacking order); None where it is stored alone or otherwise."""
    for _, ours, rule in architecture(model_type)._rules():
        m = ours.match(name)
        if m and rule.how == "rows":
            parts = m.groupdict()
            sizes = row_sizes(cfg)
            return _fill(rule.theirs, parts), [(_fill(rule.ours, {**parts, "part": n}), sizes[n]) for n in _row_parts(rule)]
    return None


def to_theirs(model_type: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict renamed into the architecture's (joined / transposed where the layout differs; `cfg` picks the
    rows meant for its kind)."""
    rules = architecture(model_type)._rules()
    for name, tensor in state.items():
        for _, ours, rule in rules:
            m = ours.match(name)
            if not m or not rule.export or (rule.when is not None and not rule.when(cfg)):
                continue
            parts = m.groupdict()
            if rule.how == "rows":
                names = _row_parts(rule)
                if parts["part"] == names[0]:  # the first part's row writes the stacked tensor
                    yield _fill(rule.theirs, parts), torch.cat([state[_fill(rule.ours, {**parts, "part": n})] for n in names], dim=0)
                break
            if rule.how == "qkv":
                if parts["qkv"] != "q":  # q's row writes the fused tensor
                    break
                three = [state[_fill(rule.ours, {**parts, "qkv": x})] for x in "qkv"]
                fused = torch.cat([w.t() for w in three], dim=1) if tensor.dim() == 2 else torch.cat(three)
                yield _fill(rule.theirs, parts), fused
            else:
                yield _fill(rule.theirs, parts), tensor.t() if rule.how == "t" else tensor
            break


# --- folders ---------------------------------------------------------------------------------------------------------


def load_hf(directory: Path, hf: dict, dtype=None) -> torch.nn.Module:
    cfg = config_from_hf(hf)
    if (directory / "generation_config.json").exists():  # what transformers' generate() stops on
        eos = io.read_json(directory / "generation_config.json").get("eos_token_id")
        if eos is not None:
            cfg.extra["generation_eos_token_id"] = eos
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LlmkitError(
            f"{directory} has no .safetensors weights", "convert the checkpoint to safetensors (llmkit never unpickles .bin files)"
        )
    model_type = cfg.extra["hf_model_type"]
    # our names and shapes, from the files' headers (meta tensors: nothing is read yet)
    shapes = {}
    for f in files:
        meta = {k: torch.empty(shape, device="meta") for k, shape in _safetensors_keys(f).items()}
        shapes.update({k: tuple(v.shape) for k, v in to_ours(model_type, meta, cfg).items()})
    kwargs = {}
    if cfg.family == "encoder":
        kwargs["mlm_head"] = "lm_head.weight" in shapes or "lm_head.bias" in shapes
        cfg.extra["mlm_head"] = kwargs["mlm_head"]
        if "classifier.1.weight" in shapes:
            cfg.num_labels = shapes["classifier.1.weight"][0]
    if cfg.family == "decoder" and "lm_head.weight" not in shapes:
        cfg.tie_embeddings = True
    if cfg.family == "encoder-decoder":
        cfg.tie_embeddings = "lm_head.weight" not in shapes  # older T5 v1.1 files carry their own LM head
    model = build_model(cfg, empty=True, dtype=dtype, **kwargs)
    tied_head = cfg.family == "encoder" and kwargs["mlm_head"] and "lm_head.weight" not in shapes  # BERT: the decoder is the embedding
    if tied_head:
        shapes["lm_head.weight"] = shapes["embed.tokens.weight"]
    skip_pooler = cfg.family == "encoder" and model.pooler is None  # BERT's pooler serves only its NSP head
    if skip_pooler:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("pooler")}
    check_state_names(model, shapes, source=str(directory))

    def stream():
        for f in files:
            for name, tensor in _stream_safetensors(f):
                for ours, t in to_ours(model_type, {name: tensor}, cfg).items():
                    if skip_pooler and ours.startswith("pooler"):
                        continue
                    yield ours, t
                    if tied_head and ours == "embed.tokens.weight":
                        yield "lm_head.weight", t

    copy_tensors(model, stream())
    return model


def export_hf(model: torch.nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a Hugging Face folder (`config.json`, `model.safetensors`, tokenizer) that `transformers` loads as is."""
    cfg = model.config
    hf = hf_config_for(cfg, mlm_head=getattr(model, "lm_head", None) is not None)
    t = hf["model_type"]
    if t == "bert" and getattr(model, "lm_head", None) is None:
        hf["architectures"] = ["BertModel"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = dict(to_theirs(t, state, cfg))
    if t == "t5" and not hf["tie_word_embeddings"]:
        out["lm_head.weight"] = state["lm_head.weight"].clone()  # its own bytes: a tied head shares the embedding's
    elif cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out.pop("cls.predictions.decoder.weight", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with io.atomic_open(directory / "model.safetensors", "wb") as f:
        f.write(_safetensors_bytes({k: v.contiguous() for k, v in out.items()}))
    io.write_json(directory / "config.json", hf)
    stop = cfg.extra.get("generation_eos_token_id", cfg.eos_token_id)
    if stop is not None and cfg.family != "encoder":  # what transformers' generate() stops on (Llama 3.1: several ids)
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": stop, "pad_token_id": cfg.pad_token_id}
        io.write_json(directory / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
