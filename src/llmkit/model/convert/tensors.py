"""Tensors into a model and safetensors files in and out, for every format: names and shapes checked before anything is
copied, tied weights (aliases) written once, files streamed tensor by tensor (a model never sits twice in memory)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmkit.errors import LlmkitError


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
