"""llmkit: a complete, fast, hackable large-language-model toolkit.

One package, one command (`llmkit`): tokenizers, data shards, transformers, pretraining, fine-tuning,
embeddings, evaluation and serving, on embedded defaults that need no download. The map of the code: CONTRIBUTING.md;
its layers and the reasons behind each dependency: docs/design.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch

    from llmkit.model.families import LanguageModel


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> LanguageModel:
    """Load a model: `smollm2`, `minilm`, a run folder, a Hugging Face folder or a GGUF file.

    Returns a `LanguageModel` (a `torch.nn.Module`) in eval mode; called on token ids (B, T) it gives logits (B, T, V) (hidden states
    for an encoder without a head). `.tokenizer` and `.config` hang on it. `dtype` casts it (e.g. torch.bfloat16),
    `device` places it, `quantize="int8"` makes its linear layers weight-only int8.
    """
    from llmkit.model.weights import load as _load

    return _load(name_or_path, dtype=dtype, device=device, quantize=quantize)


def __getattr__(name: str):
    """`__version__`, read from the installed package's metadata on first use: importlib.metadata costs ~60 ms, which
    `import llmkit` (and lm-eval's registration hook at every start-up) should not pay."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("llmkit")  # pyproject.toml's version
        except PackageNotFoundError:  # a source tree on sys.path without an install
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")


__all__ = ["LlmkitError", "__version__", "load"]
