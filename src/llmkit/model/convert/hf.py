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

    def read(self, hf: dict):
        if hf.get(self.theirs) is not None:
            value = hf[self.theirs]
        elif self.default is REQUIRED:
            raise LlmkitError(f"the config has no {self.theirs!r}", "use the config.json the checkpoint was saved with")
        else:
            value = self.default(hf) if callable(self.default) else self.default
        if self.values is not None:
            if value not in self.values:
                raise LlmkitError(f"{self.theirs} {value!r} is not supported", f"use one of: {', '.join(map(str, self.values))}")
            value = self.values[value]
        return value

    def write(self, cfg: ModelConfig):
        value = getattr(cfg, self.ours)
        if self.values is not None:
            inverse = {ours: theirs for theirs, ours in reversed(list(self.values.items()))}  # the first name wins
            value = inverse[value]
        return value


@dataclass(frozen=True)
class Rename:
    theirs: str  # a template: literal text and {name} or {name:regex} parts (i: a layer number, w: weight|bias)
    ours: str
    how: str | None = None  # "t": transposed (Conv1D); "qkv": one fused tensor of theirs, three of ours ({qkv} part)
    export: bool = True  # False: read on import only (a head the exported architecture does not have)


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
            rules.append((_pattern(r.theirs, parts), _pattern(r.ours, parts), r))
        return rules


def _rope_theta(hf: dict, default: float = 10000.0) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or default)


def rope_scaling_from_hf(hf: dict) -> tuple[dict | None, int]:
    """(our rope_scaling, the context it serves) from a Hugging Face config's `rope_scaling` or `rope_parameters`.

    The context is the longest the scaling was made for: max(max_position_embeddings, factor x the original context),
    since some configs (Qwen's yarn) keep the original length in max_position_embeddings."""
    raw = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    kind = raw.get("rope_type") or raw.get("type") or "default"
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind == "default":
        return None, max_pos
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise LlmkitError("partial rotary embeddings (partial_rotary_factor < 1) are not implemented", "use a model with full RoPE")
    scaling = {k: v for k, v in raw.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn"):  # transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings
        if hf.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_pos)
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
    # Llama's biases are all or none; queries and keys without norms (Qwen2 and Qwen3 export as themselves)
    fits=lambda cfg: cfg.qkv_bias in (None, cfg.bias) and not cfg.qk_norm,
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
    fits=lambda cfg: False,  # a Mistral without a window is a Llama: exported as one
)


def sliding_window(hf: dict) -> int | None:
    """The attention window of a config's sliding-window layers, or None when every layer attends to the whole
    context: `layer_types` when given (transformers 5), else Qwen's `use_sliding_window`, else Mistral's window."""
    window = hf.get("sliding_window")
    if not window:
        return None
    types = hf.get("layer_types")
    if types is not None:
        return int(window) if "sliding_attention" in types else None
    if hf.get("model_type") in ("qwen2", "qwen3"):
        return int(window) if hf.get("use_sliding_window") else None
    return int(window)


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
        Field("scale_decoder_outputs", "scale_decoder_outputs", lambda hf: hf.get("tie_word_embeddings", True)),
        Field("pad_token_id", "pad_token_id", 0),
        Field("eos_token_id", "eos_token_id", None),
        Field("decoder_start_token_id", "decoder_start_token_id", 0),
    ),
    renames=(
        Rename("{e:shared|encoder\\.embed_tokens|decoder\\.embed_tokens}.weight", "enc_embed.tokens.weight"),
        Rename("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc_bias.embedding.weight"),
        Rename("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "dec_bias.embedding.weight"),
        Rename("encoder.block.{i}.layer.0.SelfAttention.{p:[qkvo]}.weight", "encoder.{i}.attn.{p}_proj.weight"),
        Rename("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.{i}.attn_norm.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "encoder.{i}.mlp.up_proj.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "encoder.{i}.mlp.gate_proj.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "encoder.{i}.mlp.up_proj.weight"),
        Rename("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "encoder.{i}.mlp.down_proj.weight"),
        Rename("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.{i}.mlp_norm.weight"),
        Rename("encoder.final_layer_norm.weight", "enc_norm.weight"),
        Rename("decoder.block.{i}.layer.0.SelfAttention.{p:[qkvo]}.weight", "decoder.{i}.attn.{p}_proj.weight"),
        Rename("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.{i}.attn_norm.weight"),
        Rename("decoder.block.{i}.layer.1.EncDecAttention.{p:[qkvo]}.weight", "decoder.{i}.cross_attn.{p}_proj.weight"),
        Rename("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.{i}.cross_norm.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi.weight", "decoder.{i}.mlp.up_proj.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi_0.weight", "decoder.{i}.mlp.gate_proj.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wi_1.weight", "decoder.{i}.mlp.up_proj.weight"),
        Rename("decoder.block.{i}.layer.2.DenseReluDense.wo.weight", "decoder.{i}.mlp.down_proj.weight"),
        Rename("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.{i}.mlp_norm.weight"),
        Rename("decoder.final_layer_norm.weight", "dec_norm.weight"),
        Rename("lm_head.weight", "lm_head.weight"),
    ),
    check=_t5_check,
    exportable=False,
)

ARCHITECTURES = {a.model_type: a for a in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, BERT, T5)}


def architecture(model_type: str | None) -> Architecture:
    arch = ARCHITECTURES.get(model_type or "")
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
        values["rope_theta"] = _rope_theta(hf)
        values["rope_scaling"], values["max_seq_len"] = rope_scaling_from_hf(hf)
    window = sliding_window(hf)
    if window is not None and window < values["max_seq_len"]:
        # within one window a sliding-window layer attends to exactly what a full one does: the context is the window
        # (exact everywhere: full forward, KV cache, compiled step, engine, beam search), never a silent approximation
        extra["sliding_window"], extra["context_of_the_file"] = window, values["max_seq_len"]
        values["max_seq_len"] = window
    return ModelConfig(**values, extra=extra)


def _export_blockers(cfg: ModelConfig, arch: str) -> list[str]:
    """Settings of `cfg` that the Hugging Face architecture `arch` would silently run differently."""
    out = []
    if cfg.scale_embeddings:
        out.append("scale_embeddings (token embeddings x sqrt(d_model))")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-12:
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
    if cfg.qk_norm and arch != "qwen3":
        out.append(f"qk_norm (transformers' {arch} does not normalize queries and keys)")
    if cfg.logit_softcap is not None:
        out.append(f"logit_softcap {cfg.logit_softcap} (transformers' Llama, GPT-2 and BERT do not cap logits)")
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
    """The Hugging Face config.json that describes our model, or an error naming what has no HF equivalent."""
    arch = next((a for a in ARCHITECTURES.values() if a.exportable and _fits(a, cfg, mlm_head)), None)
    if arch is None:
        raise LlmkitError(
            f"no Hugging Face architecture matches this {cfg.family} ({cfg.position} positions, {cfg.norm} {cfg.norm_position}-norm, "
            f"{cfg.activation})",
            "export GPT-2-like or Llama-like decoders and BERT-like encoders, or keep llmkit's own format",
        )
    blockers = _export_blockers(cfg, arch.model_type)
    if blockers:
        raise LlmkitError(
            f"transformers' {arch.model_type} would run this model differently: {'; '.join(blockers)}",
            "keep llmkit's own format (llmkit.load reads it), or train without these settings",
        )
    out: dict[str, Any] = {"model_type": arch.model_type, "architectures": [arch.classes[0]]}
    for f in arch.fields:
        if f.export:
            out[f.theirs] = f.write(cfg)
    if arch.position_rope:
        out["hidden_act"] = "silu"
        if cfg.rope_scaling:
            scaling = dict(cfg.rope_scaling)
            if scaling["rope_type"] == "dynamic":  # transformers' dynamic NTK starts growing at max_position_embeddings
                out["max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
            out["rope_scaling"] = {**scaling, "rope_theta": cfg.rope_theta}
    elif arch is GPT2:
        out.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch is BERT:
        out.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return out


# --- tensor names ----------------------------------------------------------------------------------------------------


def to_ours(model_type: str, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict renamed into ours (split / transposed where the layout differs); names no row knows are
    left out."""
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
        else:
            ours[_fill(rule.ours, parts)] = tensor.t().contiguous() if rule.how == "t" else tensor
    return ours


def hf_name(model_type: str, name: str) -> str | None:
    """Our tensor name -> theirs (one-to-one renames only: None for GPT-2's fused attention and for unknown names)."""
    for _, ours, rule in architecture(model_type)._rules():
        m = ours.match(name)
        if m and rule.how != "qkv" and rule.export:
            return _fill(rule.theirs, m.groupdict())
    return None


def to_theirs(model_type: str, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict renamed into the architecture's (joined / transposed where the layout differs)."""
    rules = architecture(model_type)._rules()
    for name, tensor in state.items():
        for _, ours, rule in rules:
            m = ours.match(name)
            if not m or not rule.export:
                continue
            parts = m.groupdict()
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
        shapes.update({k: tuple(v.shape) for k, v in to_ours(model_type, meta).items()})
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
                for ours, t in to_ours(model_type, {name: tensor}).items():
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
    out = dict(to_theirs(t, state))
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out.pop("cls.predictions.decoder.weight", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with io.atomic_open(directory / "model.safetensors", "wb") as f:
        f.write(_safetensors_bytes({k: v.contiguous() for k, v in out.items()}))
    io.write_json(directory / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
