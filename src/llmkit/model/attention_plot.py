"""Attention maps as pictures: a grid of heat maps, one row per layer and one column per head, tokens on the axes.

Row = the query token (who looks), column = the key token (who is looked at); each row sums to 1.
"""

from __future__ import annotations

import torch

from llmkit import io
from llmkit.errors import LlmkitError


def attention_for_text(model, text: str) -> tuple[list[str], list[torch.Tensor]]:
    """(token strings, per-layer attention weights (n_heads, T, T)) of `text` under `model`."""
    tok = model.tokenizer
    if tok is None:
        raise LlmkitError("this model has no tokenizer to turn the sentence into ids", "use a model folder that includes tokenizer.json")
    ids = tok.encode(text)  # with the model's own special tokens ([CLS] ... [SEP] for BERT)
    if not ids:
        raise LlmkitError("the sentence is empty", "give a sentence with some words")
    if len(ids) > 64:
        raise LlmkitError(f"the sentence is {len(ids)} tokens; the picture stays readable up to 64", "use a shorter sentence")
    with torch.no_grad():
        maps = model.attention_maps(torch.tensor([ids]))
    labels = [tok.decode([i]) for i in ids]
    return labels, [m[0] for m in maps]


MAX_LAYERS, MAX_HEADS = 6, 8  # the default grid when neither is chosen: a picture a person can read (SmolLM2 has 30 x 9)


def spread(n: int, k: int) -> list[int]:
    """`k` indices from 0 to n - 1, evenly apart, the first and the last among them (all n when n <= k)."""
    return list(range(n)) if n <= k else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def plot_attention(
    labels: list[str], maps: list[torch.Tensor], path, *, layers=None, heads=None, title: str = ""
) -> tuple[list[int], list[int]]:
    """Draw the chosen layers x heads (by default, at most MAX_LAYERS layers spread from the first to the last and the
    first MAX_HEADS heads); returns (layers, heads) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = spread(len(maps), MAX_LAYERS) if layers is None else layers
    heads = list(range(min(maps[0].shape[0], MAX_HEADS))) if heads is None else heads
    for name, chosen, n in (("layer", layers, len(maps)), ("head", heads, maps[0].shape[0])):
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise LlmkitError(f"{name} {bad[0]} does not exist (the model has {n})", f"pick {name}s between 0 and {n - 1}")
    cell = 0.9 + 0.12 * len(labels)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads), cell * len(layers)), squeeze=False)
    shown = [repr(t)[1:-1] for t in labels]
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[layer][head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(shown)))
            ax.set_yticks(range(len(shown)))
            small = max(4, 9 - len(shown) // 8)
            ax.set_xticklabels(shown if r == len(layers) - 1 else [], rotation=90, fontsize=small)
            ax.set_yticklabels(shown if c == 0 else [], fontsize=small)
            if r == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    fig.suptitle(title or "attention (rows: queries, columns: keys)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # half an inch above the grid for the title
    io.save_figure(fig, path)
    plt.close(fig)
    return layers, heads
