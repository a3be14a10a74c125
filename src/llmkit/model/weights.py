"""Weights in and out: our run folders, Hugging Face folders (GPT-2, BERT, Llama, T5) and GGUF (Llama family).

    our folder     config.json (ModelConfig) + model.safetensors + tokenizer.json
    Hugging Face   config.json (model_type) + model.safetensors, names mapped by NAME_MAPS below
    GGUF           llama.cpp's names and quantized blocks (Q4_1, Q8_0, F32, ... dequantized by `gguf`)

Nothing here unpickles: safetensors and GGUF only. `load(name_or_path)` is the one front door.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from llmkit import io
from llmkit.embedded import EMBEDDED, embedded_path
from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig
from llmkit.model.families import LanguageModel

FORMAT = "llmkit"

# --- Hugging Face configs -> ModelConfig -----------------------------------------------------------------


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
    from llmkit.model.config import check_rope_scaling

    check_rope_scaling(scaling)
    if kind == "linear":  # no original length is recorded: the config's own is the context (an export keeps it)
        return scaling, max_pos
    return scaling, max(max_pos, int(float(scaling["factor"]) * scaling["original_max_position_embeddings"]))


def config_from_hf(hf: dict) -> ModelConfig:
    t = hf.get("model_type")
    if t == "gpt2":
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[
            hf.get("activation_function", "gelu_new")
        ]
        return ModelConfig(
            family="decoder",
            vocab_size=hf["vocab_size"],
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf["n_positions"],
            position="learned",
            activation=act,
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            norm_position="pre",
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            extra={"hf_model_type": t},
        )
    if t == "llama":
        d, nh = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("hidden_act", "silu") != "silu":
            raise LlmkitError(f"Llama hidden_act {hf['hidden_act']!r} is not supported", "use a Llama with SiLU (SwiGLU) feed-forward")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):  # transformers' defaults: both False
            raise LlmkitError(
                "a Llama config with biases on attention but not on the feed-forward (or the reverse) is not supported",
                "use attention_bias == mlp_bias",
            )
        scaling, context = rope_scaling_from_hf(hf)
        return ModelConfig(
            family="decoder",
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=nh,
            n_kv_heads=hf.get("num_key_value_heads") or nh,
            head_dim=hf.get("head_dim") or d // nh,
            d_ff=hf["intermediate_size"],
            max_seq_len=context,
            position="rope",
            rope_theta=_rope_theta(hf),
            rope_scaling=scaling,
            activation="swiglu",
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm_position="pre",
            bias=bool(hf.get("attention_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            extra={"hf_model_type": t},
        )
    if t == "bert":
        return ModelConfig(
            family="encoder",
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"],
            position="learned",
            activation={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[hf.get("hidden_act", "gelu")],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            norm_position="post",
            bias=True,
            type_vocab_size=hf.get("type_vocab_size", 2),
            embedding_norm=True,
            lm_head_bias=True,
            mlm_transform=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            pad_token_id=hf.get("pad_token_id") or 0,
            extra={"hf_model_type": t},
        )
    if t == "t5":
        proj = hf.get("feed_forward_proj", "relu")
        act = {"relu": "relu", "gated-gelu": "geglu"}.get(proj)
        if act is None:
            raise LlmkitError(f"T5 feed_forward_proj {proj!r} is not supported", "use a T5 with relu or gated-gelu feed-forward")
        return ModelConfig(
            family="encoder-decoder",
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            n_layers=hf["num_layers"],
            n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            n_heads=hf["num_heads"],
            head_dim=hf["d_kv"],
            d_ff=hf["d_ff"],
            max_seq_len=hf.get("n_positions", 512),
            position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            activation=act,
            norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            norm_position="pre",
            bias=False,
            attn_scale=1.0,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            fp16_clamp=True,
            scale_decoder_outputs=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)),
            pad_token_id=hf.get("pad_token_id", 0),
            eos_token_id=hf.get("eos_token_id"),
            decoder_start_token_id=hf.get("decoder_start_token_id", 0),
            extra={"hf_model_type": t},
        )
    raise LlmkitError(f"Hugging Face model type {t!r} is not supported", "use a GPT-2, BERT, Llama or T5 checkpoint")


# --- Hugging Face names -> ours ---------------------------------------------------------------------------
# Each rule: (regex on the HF name, our name template, transform). Conv1D (GPT-2) weights are (in, out): transposed.

_T = "t"  # transpose

NAME_MAPS = {
    "gpt2": [
        (r"transformer\.wte\.weight", "embed.tokens.weight", None),
        (r"transformer\.wpe\.weight", "embed.position.weight", None),
        (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.attn_norm.\2", None),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blocks.\1.attn.{q,k,v}_proj.\2", "split3"),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"blocks.\1.attn.o_proj.weight", _T),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.bias", r"blocks.\1.attn.o_proj.bias", None),
        (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.mlp_norm.\2", None),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", r"blocks.\1.mlp.up_proj.weight", _T),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.bias", r"blocks.\1.mlp.up_proj.bias", None),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"blocks.\1.mlp.down_proj.weight", _T),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.bias", r"blocks.\1.mlp.down_proj.bias", None),
        (r"transformer\.ln_f\.(weight|bias)", r"norm.\1", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "embed.tokens.weight", None),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight", None),
        (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"blocks.\1.attn.\2_proj.\3", None),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight", None),
        (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"blocks.\1.mlp.\2_proj.\3", None),
        (r"model\.norm\.weight", "norm.weight", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
    "bert": [
        (r"(?:bert\.)?embeddings\.word_embeddings\.weight", "embed.tokens.weight", None),
        (r"(?:bert\.)?embeddings\.position_embeddings\.weight", "embed.position.weight", None),
        (r"(?:bert\.)?embeddings\.token_type_embeddings\.weight", "embed.token_type.weight", None),
        (r"(?:bert\.)?embeddings\.LayerNorm\.(weight|bias)", r"embed.norm.\1", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.attn_norm.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.up_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.down_proj.\2", None),
        (r"(?:bert\.)?encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.mlp_norm.\2", None),
        (r"(?:bert\.)?pooler\.dense\.(weight|bias)", r"pooler.0.\1", None),
        (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_transform.0.\1", None),
        (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_transform.2.\1", None),
        (r"cls\.predictions\.decoder\.weight", "lm_head.weight", None),
        (r"cls\.predictions\.(?:decoder\.)?bias", "lm_head.bias", None),
        (r"classifier\.(weight|bias)", r"classifier.1.\1", None),
    ],
    "t5": [
        (r"(?:shared|encoder\.embed_tokens|decoder\.embed_tokens)\.weight", "enc_embed.tokens.weight", None),
        (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "enc_bias.embedding.weight", None),
        (r"decoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "dec_bias.embedding.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"encoder.\1.attn.\2_proj.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"encoder.\1.attn_norm.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi\.weight", r"encoder.\1.mlp.up_proj.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"encoder.\1.mlp.gate_proj.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"encoder.\1.mlp.up_proj.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"encoder.\1.mlp.down_proj.weight", None),
        (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"encoder.\1.mlp_norm.weight", None),
        (r"encoder\.final_layer_norm\.weight", "enc_norm.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"decoder.\1.attn.\2_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"decoder.\1.attn_norm.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.weight", r"decoder.\1.cross_attn.\2_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"decoder.\1.cross_norm.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.wi\.weight", r"decoder.\1.mlp.up_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.wi_0\.weight", r"decoder.\1.mlp.gate_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.wi_1\.weight", r"decoder.\1.mlp.up_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.wo\.weight", r"decoder.\1.mlp.down_proj.weight", None),
        (r"decoder\.block\.(\d+)\.layer\.2\.layer_norm\.weight", r"decoder.\1.mlp_norm.weight", None),
        (r"decoder\.final_layer_norm\.weight", "dec_norm.weight", None),
        (r"lm_head\.weight", "lm_head.weight", None),
    ],
}


def map_hf_state_dict(model_type: str, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose where the layout differs) a Hugging Face state dict into ours."""
    rules = [(re.compile(p + "$"), out, how) for p, out, how in NAME_MAPS[model_type]]
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        for pattern, template, how in rules:
            m = pattern.match(name)
            if not m:
                continue
            target = m.expand(template)
            if how == "split3":  # GPT-2's fused c_attn: (D, 3D) Conv1D weight or (3D,) bias -> q, k, v
                parts = tensor.chunk(3, dim=-1)
                for letter, part in zip("qkv", parts):
                    ours[target.replace("{q,k,v}", letter)] = part.t().contiguous() if part.dim() == 2 else part.contiguous()
            else:
                ours[target] = tensor.t().contiguous() if how == _T else tensor
            break
    return ours


# --- loading into a model --------------------------------------------------------------------------------


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names of tensors that share storage with an earlier name (tied embeddings): alias -> first name."""
    first: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def check_state_names(model: torch.nn.Module, shapes: dict[str, tuple], *, source: str) -> None:
    """Refuse missing, unexpected or mis-shaped tensors (name -> shape) with a clear error, before any is copied.
    A tied tensor (e.g. an LM head that is the token embedding) may be given under either name."""
    own = model.state_dict()
    aliases = _aliases(model)
    missing = [k for k in own if k not in shapes and not (k in aliases and aliases[k] in shapes)]
    unexpected = [k for k in shapes if k not in own]
    wrong = [f"{k}: {tuple(shapes[k])} vs {tuple(own[k].shape)}" for k in shapes if k in own and tuple(shapes[k]) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:4]}" if missing else "",
                    f"unexpected {unexpected[:4]}" if unexpected else "",
                    f"shape mismatch {wrong[:3]}" if wrong else "",
                ],
            )
        )
        raise LlmkitError(
            f"the weights in {source} do not fit the model ({detail})",
            "check that the checkpoint and its config.json belong together (re-export or re-train it)",
        )


def copy_tensors(model: torch.nn.Module, items) -> None:
    """Copy (name, tensor) pairs into the model one at a time, cast to each parameter's dtype: a stream of tensors
    (read or dequantized one by one) never holds a second copy of the whole model."""
    own = model.state_dict()
    aliases = _aliases(model)
    with torch.no_grad():
        for k, v in items:
            if k not in aliases:
                own[k].copy_(v.to(own[k].dtype))


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy `state` into `model`, refusing missing, unexpected or mis-shaped tensors with a clear error."""
    check_state_names(model, {k: tuple(v.shape) for k, v in state.items()}, source=source)
    copy_tensors(model, state.items())


# --- our own folders ---------------------------------------------------------------------------------------


def save_model(model: torch.nn.Module, directory: str | os.PathLike, tokenizer=None, state: dict | None = None) -> Path:
    """Write `config.json`, `model.safetensors` (and the tokenizer) into `directory`, each atomically.
    `state` replaces `model.state_dict()` (e.g. the full weights gathered from a sharded model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aliases = _aliases(model)  # a tied tensor is written once, under its first name
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items() if k not in aliases}
    with io.atomic_open(directory / "model.safetensors", "wb") as f:
        f.write(_safetensors_bytes(state))
    io.write_json(directory / "config.json", {"format": FORMAT, **model.config.to_dict()})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _safetensors_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(
            f"{path} is not a readable safetensors file ({e})", "the file is corrupt or truncated: re-save or re-download it"
        ) from None


def _safetensors_keys(path: Path) -> dict[str, tuple]:
    """name -> shape of every tensor in a safetensors file, read from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(
            f"{path} is not a readable safetensors file ({e})", "the file is corrupt or truncated: re-save or re-download it"
        ) from None


def _stream_safetensors(path: Path):
    """(name, tensor) pairs of a safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k)


def _load_own(directory: Path, dtype=None) -> torch.nn.Module:
    from llmkit.model import build_model

    raw = io.read_json(directory / "config.json")
    raw.pop("format", None)
    cfg = ModelConfig.from_dict(raw)
    model = build_model(cfg, empty=True, dtype=dtype, **({"mlm_head": cfg.extra.get("mlm_head", True)} if cfg.family == "encoder" else {}))
    file = directory / "model.safetensors"
    check_state_names(model, _safetensors_keys(file), source=str(directory))
    copy_tensors(model, _stream_safetensors(file))
    return model


def _load_hf(directory: Path, hf: dict, dtype=None) -> torch.nn.Module:
    from llmkit.model import build_model

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
        shapes.update({k: tuple(v.shape) for k, v in map_hf_state_dict(model_type, meta).items()})
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
                for ours, t in map_hf_state_dict(model_type, {name: tensor}).items():
                    if skip_pooler and ours.startswith("pooler"):
                        continue
                    yield ours, t
                    if tied_head and ours == "embed.tokens.weight":
                        yield "lm_head.weight", t

    copy_tensors(model, stream())
    return model


# --- GGUF (llama.cpp) --------------------------------------------------------------------------------------


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
    import collections

    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


def load_gguf(path: str | os.PathLike, dtype=None) -> tuple[torch.nn.Module, object]:
    """A Llama-architecture GGUF file -> (Decoder with dequantized weights in `dtype` (float32 by default), Tokenizer).
    Each tensor is cast as it is dequantized, so a bf16 load never holds a float32 copy of the model."""
    import gguf

    from llmkit.model import build_model
    from llmkit.tokenizer.pretrained import tokenizer_from_gguf_fields

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
    model.gguf_blocks = GGUFBlocks(
        path,
        {
            t.name: (ours[t.name][0], heads.get(ours[t.name][2]))
            for t in reader.tensors
            if t.name in ours and t.tensor_type.name in BLOCK_KINDS and len(t.shape) == 2
        },
    )
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


# --- the front door --------------------------------------------------------------------------------------


def _load_lora_folder(path: Path, dtype, device, quantize) -> torch.nn.Module:
    """A LoRA run of `llmkit finetune` (adapter_config.json + adapter_model.safetensors, PEFT's format): its base model
    (`base_model_name_or_path`) with the adapter merged in, so it decodes as fast as the base."""
    from llmkit.model.lora import load_lora, merge_and_unwrap

    cfg = io.read_json(path / "adapter_config.json")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise LlmkitError(
            f"{path}/adapter_config.json names no base model (base_model_name_or_path)",
            "write the base model's name or path there (e.g. smollm2)",
        )
    if Path(str(base)).resolve() == path.resolve():
        raise LlmkitError(f"{path}: the adapter names itself as its base model", "set base_model_name_or_path to the base model")
    model = load(base, device=device)
    load_lora(model, path)
    merge_and_unwrap(model)
    model.gguf_weights = None  # merged weights are no longer the file's
    model.requires_grad_(False)
    model.config.extra["adapter"] = str(path)
    if quantize:
        from llmkit.model.quantize import quantize as quantize_model

        model.to(dtype=dtype) if dtype is not None else None
        return quantize_model(model, quantize)
    return model.to(dtype=dtype) if dtype is not None else model


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (each tensor's name, shape, dtype, first values and sum): it changes when the
    model is trained further, so caches keyed by it never serve another model's answers."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[:16].float().cpu().numpy().tobytes())
            h.update(flat.float().sum().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def sentence_config(path: Path) -> dict | None:
    """A sentence-transformers folder's embedding rules: {"max_seq_length", "pooling" (mean, cls, last, max), "normalize"}
    from sentence_bert_config.json, its Pooling module's config.json and modules.json; None elsewhere."""
    if not (path / "sentence_bert_config.json").exists():
        return None
    out = {"max_seq_length": io.read_json(path / "sentence_bert_config.json").get("max_seq_length"), "pooling": None, "normalize": False}
    modules = io.read_json(path / "modules.json") if (path / "modules.json").exists() else []
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling") and (path / m.get("path", "") / "config.json").exists():
            pooling = io.read_json(path / m["path"] / "config.json")
            for key, name in (
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_lasttoken", "last"),
                ("pooling_mode_max_tokens", "max"),
            ):
                if pooling.get(key):
                    out["pooling"] = name
                    break
        out["normalize"] = out["normalize"] or kind.endswith("Normalize")
    return out


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None, quantize: str | None = None) -> LanguageModel:
    """Load a model: an embedded name (`smollm2`, `minilm`), our run folder, a LoRA run folder (its base model with the
    adapter merged), a Hugging Face folder or a GGUF file.

    Returns the model (a `LanguageModel`, in eval mode) with `.config` (ModelConfig) and `.tokenizer` (or None). `dtype` casts
    it (e.g. torch.bfloat16); `quantize="int8"` makes its linear layers weight-only int8 (fast CPU decoding).
    """
    from llmkit.tokenizer import Tokenizer

    spec = str(name_or_path)
    path = embedded_path(spec) if spec in EMBEDDED else Path(spec)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "model.safetensors").exists():
        return _load_lora_folder(path, dtype, device, quantize)
    tokenizer = None
    load_dtype = None if quantize else dtype  # quantization starts from float32 weights
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.gguf"))):
        model, tokenizer = load_gguf(path if path.suffix == ".gguf" else sorted(path.glob("*.gguf"))[0], load_dtype)
    elif path.is_dir() and (path / "config.json").exists():
        raw = io.read_json(path / "config.json")
        model = _load_own(path, load_dtype) if raw.get("format") == FORMAT else _load_hf(path, raw, load_dtype)
        if (path / "tokenizer.json").exists():
            tokenizer = Tokenizer.load(path)
    elif path.exists():
        raise LlmkitError(
            f"{path} is neither a model folder (config.json + safetensors) nor a GGUF file",
            "point at a run folder, a Hugging Face folder or a .gguf file",
        )
    else:
        raise LlmkitError(
            f"no model at {spec!r}", f"give a run folder, a Hugging Face folder, a .gguf file, or one of: {', '.join(EMBEDDED)}"
        )
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise LlmkitError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}",
            "use the tokenizer that was saved with this model",
        )
    model.tokenizer = tokenizer
    model.name_or_path = spec
    model.sentence_config = sentence_config(path) if path.is_dir() else None
    model.eval()
    if device is not None:
        model.to(device=device)
    if dtype is not None and quantize:
        model.to(dtype=dtype)
    if quantize:
        from llmkit.model.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    return model


# --- export to Hugging Face ----------------------------------------------------------------------------------


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
    if cfg.qk_norm:
        out.append("qk_norm (transformers' Llama, GPT-2 and BERT do not normalize queries and keys)")
    if cfg.logit_softcap is not None:
        out.append(f"logit_softcap {cfg.logit_softcap} (transformers' Llama, GPT-2 and BERT do not cap logits)")
    return out


def hf_config_for(cfg: ModelConfig, *, mlm_head: bool = True) -> dict:
    """The Hugging Face config.json that describes our model, or an error naming what has no HF equivalent."""
    gpt2_like = (
        cfg.family == "decoder"
        and cfg.position == "learned"
        and cfg.norm == "layernorm"
        and cfg.norm_position == "pre"
        and cfg.bias
        and cfg.activation in ("gelu_tanh", "gelu", "relu")
        and cfg.n_kv_heads == cfg.n_heads
        and cfg.tie_embeddings
    )
    llama_like = (
        cfg.family == "decoder"
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.norm_position == "pre"
        and cfg.activation == "swiglu"
    )
    bert_like = (
        cfg.family == "encoder"
        and cfg.position == "learned"
        and cfg.norm == "layernorm"
        and cfg.norm_position == "post"
        and cfg.bias
        and cfg.embedding_norm
        and cfg.type_vocab_size > 0
        and (cfg.mlm_transform and cfg.lm_head_bias or not mlm_head)
        and cfg.activation in ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
    )
    arch = "gpt2" if gpt2_like else "llama" if llama_like else "bert" if bert_like else None
    if arch is None:
        raise LlmkitError(
            f"no Hugging Face architecture matches this {cfg.family} ({cfg.position} positions, {cfg.norm} {cfg.norm_position}-norm, "
            f"{cfg.activation})",
            "export GPT-2-like or Llama-like decoders and BERT-like encoders, or keep llmkit's own format",
        )
    blockers = _export_blockers(cfg, arch)
    if blockers:
        raise LlmkitError(
            f"transformers' {arch} would run this model differently: {'; '.join(blockers)}",
            "keep llmkit's own format (llmkit.load reads it), or train without these settings",
        )
    if gpt2_like:
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        }
    if llama_like:
        out = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu",
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        }
        if cfg.rope_scaling:
            scaling = dict(cfg.rope_scaling)
            if scaling["rope_type"] == "dynamic":  # transformers' dynamic NTK starts growing at max_position_embeddings
                out["max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
            out["rope_scaling"] = {**scaling, "rope_theta": cfg.rope_theta}
        return out
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    return {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def export_hf(model: torch.nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a Hugging Face folder (`config.json`, `model.safetensors`, tokenizer) that `transformers` loads as is."""
    cfg = model.config
    hf = hf_config_for(cfg, mlm_head=getattr(model, "lm_head", None) is not None)
    t = hf["model_type"]
    if t == "bert" and getattr(model, "lm_head", None) is None:
        hf["architectures"] = ["BertModel"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if t == "gpt2":
        for name, v in state.items():
            m = re.match(r"blocks\.(\d+)\.(.+)$", name)
            if m:
                i, rest = m.groups()
                p = f"transformer.h.{i}."
                if rest.startswith("attn.q_proj"):
                    kind = rest.rsplit(".", 1)[1]
                    parts = [state[f"blocks.{i}.attn.{x}_proj.{kind}"] for x in "qkv"]
                    out[p + f"attn.c_attn.{kind}"] = torch.cat([w.t() for w in parts], dim=1) if kind == "weight" else torch.cat(parts)
                elif rest.startswith(("attn.k_proj", "attn.v_proj")):
                    continue
                else:
                    hf_rest = {
                        "attn_norm": "ln_1",
                        "mlp_norm": "ln_2",
                        "attn.o_proj": "attn.c_proj",
                        "mlp.up_proj": "mlp.c_fc",
                        "mlp.down_proj": "mlp.c_proj",
                    }
                    mod, kind = rest.rsplit(".", 1)
                    out[p + f"{hf_rest[mod]}.{kind}"] = v.t() if kind == "weight" and mod not in ("attn_norm", "mlp_norm") else v
            elif name == "embed.tokens.weight":
                out["transformer.wte.weight"] = v
            elif name == "embed.position.weight":
                out["transformer.wpe.weight"] = v
            elif name.startswith("norm."):
                out["transformer.ln_f." + name.split(".")[1]] = v
    else:
        for name, v in state.items():
            hf_name = _invert_name(t, name)
            if hf_name is not None:
                out[hf_name] = v
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


def _invert_name(model_type: str, name: str) -> str | None:
    """Our parameter name -> the Hugging Face name (Llama and BERT: one-to-one renames)."""
    if model_type == "llama":
        rules = [
            (r"embed\.tokens\.weight", "model.embed_tokens.weight"),
            (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
            (r"blocks\.(\d+)\.attn\.([qkvo])_proj\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
            (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
            (r"blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
            (r"norm\.weight", "model.norm.weight"),
            (r"lm_head\.weight", "lm_head.weight"),
        ]
    else:  # bert
        rules = [
            (r"embed\.tokens\.weight", "bert.embeddings.word_embeddings.weight"),
            (r"embed\.position\.weight", "bert.embeddings.position_embeddings.weight"),
            (r"embed\.token_type\.weight", "bert.embeddings.token_type_embeddings.weight"),
            (r"embed\.norm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
            (r"blocks\.(\d+)\.attn\.q_proj\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.query.\2"),
            (r"blocks\.(\d+)\.attn\.k_proj\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.key.\2"),
            (r"blocks\.(\d+)\.attn\.v_proj\.(weight|bias)", r"bert.encoder.layer.\1.attention.self.value.\2"),
            (r"blocks\.(\d+)\.attn\.o_proj\.(weight|bias)", r"bert.encoder.layer.\1.attention.output.dense.\2"),
            (r"blocks\.(\d+)\.attn_norm\.(weight|bias)", r"bert.encoder.layer.\1.attention.output.LayerNorm.\2"),
            (r"blocks\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"bert.encoder.layer.\1.intermediate.dense.\2"),
            (r"blocks\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"bert.encoder.layer.\1.output.dense.\2"),
            (r"blocks\.(\d+)\.mlp_norm\.(weight|bias)", r"bert.encoder.layer.\1.output.LayerNorm.\2"),
            (r"pooler\.0\.(weight|bias)", r"bert.pooler.dense.\1"),
            (r"mlm_transform\.0\.(weight|bias)", r"cls.predictions.transform.dense.\1"),
            (r"mlm_transform\.2\.(weight|bias)", r"cls.predictions.transform.LayerNorm.\1"),
            (r"lm_head\.weight", "cls.predictions.decoder.weight"),
            (r"lm_head\.bias", "cls.predictions.bias"),
        ]
    for pattern, template in rules:
        m = re.match(pattern + "$", name)
        if m:
            return m.expand(template)
    return None
