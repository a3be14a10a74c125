"""llmkit's own run folders: config.json (ModelConfig, with "format": "llmkit") + model.safetensors + the tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmkit import io
from llmkit.model import build_model
from llmkit.model.config import ModelConfig
from llmkit.model.convert.tensors import (
    _aliases,
    _safetensors_bytes,
    _safetensors_keys,
    _stream_safetensors,
    check_state_names,
    copy_tensors,
)

FORMAT = "llmkit"


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


def read_config(directory: Path) -> ModelConfig:
    """The ModelConfig of one of our folders (config.json without its "format" mark)."""
    raw = io.read_json(directory / "config.json")
    raw.pop("format", None)
    return ModelConfig.from_dict(raw)


def load_own(directory: Path, dtype=None) -> torch.nn.Module:
    cfg = read_config(directory)
    model = build_model(cfg, empty=True, dtype=dtype, **({"mlm_head": cfg.extra.get("mlm_head", True)} if cfg.family == "encoder" else {}))
    file = directory / "model.safetensors"
    check_state_names(model, _safetensors_keys(file), source=str(directory))
    copy_tensors(model, _stream_safetensors(file))
    return model
