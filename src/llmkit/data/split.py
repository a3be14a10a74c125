"""Train/validation split by document, with a seed: no document is in both.

A corpus of fewer than `MIN_UNITS` documents (one big text file, say) is first cut at blank lines into
about `MIN_UNITS * 10` blocks, so that there is still something to hold out.
"""

from __future__ import annotations

import random

from llmkit.errors import LlmkitError

MIN_UNITS = 10


def blocks(text: str, n_blocks: int) -> list[str]:
    """Cut `text` at blank lines into about `n_blocks` blocks (each a run of whole paragraphs)."""
    paragraphs = text.split("\n\n")
    target = max(1, len(text) // n_blocks)
    out, current, size = [], [], 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= target:
            out.append("\n\n".join(current) + "\n\n")
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return [b for b in out if b.strip()]


def split_documents(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) lists of texts; the validation share is `val_fraction` of the units."""
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"validation fraction {val_fraction} is not in [0, 1)", "use e.g. --val-fraction 0.1")
    units = list(texts)
    if val_fraction > 0 and len(units) < MIN_UNITS:
        units = [b for t in units for b in blocks(t, MIN_UNITS * 10 // max(len(units), 1))]
    if val_fraction == 0:
        return units, []
    if len(units) < 2:
        raise LlmkitError("the corpus is too small to hold out a validation split", "add text, or pass --val-fraction 0")
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    n_val = min(len(units) - 1, max(1, round(len(units) * val_fraction)))
    val_idx = set(order[:n_val])
    return [u for i, u in enumerate(units) if i not in val_idx], [u for i, u in enumerate(units) if i in val_idx]
