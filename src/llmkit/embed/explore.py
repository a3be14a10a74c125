"""Looking at a vector space: categories found by KMeans, and a 2-D map (PCA or t-SNE, scikit-learn) drawn as a
labelled picture, coloured by cluster or by given categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit import io
from llmkit.errors import LlmkitError


def read_words(path: str | Path, *, lines: bool = False) -> tuple[list[str], list[str] | None]:
    """Words (one per line, or whitespace-separated), optionally with a category after a tab: `cat<TAB>animals`.
    With `lines`, every line is one item (a sentence for a model)."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no word list at {path}", "give a file of words, one per line (optionally word<TAB>category)")
    words, cats = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" in line:
            w, c = line.split("\t", 1)
            words.append(w.strip())
            cats.append(c.strip())
        else:
            words += [line.strip()] if lines else line.split()
    if not words:
        raise LlmkitError(f"{path} holds no word", "write one word per line")
    return words, (cats if cats and len(cats) == len(words) else None)


def cluster(vectors: np.ndarray, labels: list[str], k: int, seed: int = 0) -> dict[str, list[str]]:
    """KMeans on the unit vectors (cosine geometry): {"0": [words...], "1": [...], ...}, biggest cluster first."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(labels):
        raise LlmkitError(f"--k {k} clusters for {len(labels)} words", f"use a k between 1 and {len(labels)}")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    ids = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit)
    groups: dict[int, list[str]] = {}
    for word, c in zip(labels, ids):
        groups.setdefault(int(c), []).append(word)
    return {str(i): g for i, g in enumerate(sorted(groups.values(), key=len, reverse=True))}


def project(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates: PCA, or t-SNE (cosine, perplexity fitted to N)."""
    if len(vectors) < 2:
        raise LlmkitError("a map needs two points or more", "give more words")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method == "tsne":
        from sklearn.manifold import TSNE

        if len(vectors) < 3:
            raise LlmkitError(f"t-SNE needs 3 points or more, not {len(vectors)}", "give more words, or use --method pca")
        return TSNE(
            n_components=2, perplexity=min(30.0, max(2.0, (len(vectors) - 1) / 3)), metric="cosine", init="pca", random_state=seed
        ).fit_transform(vectors)
    raise LlmkitError(f"unknown projection {method!r}", "use pca or tsne")


def draw_map(points: np.ndarray, labels: list[str], path: str | Path, *, groups: list[str] | None = None, title: str = "") -> None:
    """A scatter of labelled points, one colour per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    groups = groups or ["all"] * len(labels)
    names = list(dict.fromkeys(groups))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for n_i, name in enumerate(names):
        idx = [i for i, g in enumerate(groups) if g == name]
        ax.scatter(points[idx, 0], points[idx, 1], s=30, color=colours(n_i % 20), label=name if len(names) > 1 else None)
    for (x, y), label in zip(points, labels):
        ax.annotate(label if len(label) <= 40 else label[:37] + "...", (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    longest = min(max(len(label) for label in labels), 40)
    lo, hi = float(points[:, 0].min()), float(points[:, 0].max())
    span = (hi - lo) or 1.0
    ax.set_xlim(lo - 0.05 * span, hi + span * (0.05 + longest * 0.012))  # room for the labels right of the points
    if len(names) > 1:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    io.save_figure(fig, path)
    plt.close(fig)


def draw_similarity(sims: np.ndarray, labels: list[str], path: str | Path, *, title: str = "") -> None:
    """A heat map of cosine similarities with each value written in its cell: readable for two items, where a 2-D map
    of two points says nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(3 + 1.2 * n, 1.5 + 0.9 * n))
    image = ax.imshow(sims, cmap="viridis", vmin=min(0.0, float(sims.min())), vmax=1.0)
    shown = [label if len(label) <= 40 else label[:37] + "..." for label in labels]
    ax.set_xticks(range(n), [f"[{i}]" for i in range(n)])
    ax.set_yticks(range(n), [f"[{i}] {s}" for i, s in enumerate(shown)], fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", color="white" if sims[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    io.save_figure(fig, path)
    plt.close(fig)
