"""Embeddings: words and texts as vectors, and what people do with them.

    static.py       Word2Vec (gensim) and GloVe (written here) trained on a corpus: one vector per word
    vectors.py      a set of word vectors: similarity, nearest neighbours, analogies, odd one out, evaluation
    contextual.py   vectors of texts (mean / CLS / last-token pooling) and of words in their sentence, from any model
    explore.py      categories (KMeans) and 2-D maps (PCA, t-SNE) drawn as pictures
    search.py       semantic search over passages with a FAISS index

`llmkit embed ...` is the command line over these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit.errors import LlmkitError
from llmkit.model.weights import load as load_model


def is_static(spec: str) -> bool:
    """A folder of `llmkit embed train`, or a word2vec / GloVe text file (.txt, .vec)."""
    path = Path(spec)
    return (path / "vectors.npy").exists() or (path.is_file() and path.suffix.lower() in (".txt", ".vec"))


def load_vectors(spec: str):
    """Static vectors: a folder of `llmkit embed train`, or a text file of word vectors (word2vec's format with its
    "count dim" header, or GloVe's without one)."""
    from llmkit.embed.static import load_static
    from llmkit.embed.vectors import read_text_vectors

    return read_text_vectors(spec) if Path(spec).is_file() else load_static(spec)


def vectors_of(spec: str, items: list[str], *, pooling: str | None = None) -> np.ndarray:
    """(N, D) vectors of `items`: each word's vector from a static set, or each item embedded as a text by a model."""
    if is_static(spec):
        vecs = load_vectors(spec)
        return np.stack([vecs.vector(w) for w in items])
    from llmkit.embed.contextual import embed_texts

    try:
        model = load_model(spec)
    except LlmkitError as e:
        raise LlmkitError(
            f"{spec!r} is neither a folder of static vectors nor a model ({e.message})",
            "give a folder written by `llmkit embed train`, or a model such as minilm",
        ) from None
    return embed_texts(model, items, pooling=pooling)


def static_only(spec: str, what: str):
    if not is_static(spec):
        raise LlmkitError(
            f"{what} needs static word vectors (a vocabulary to search); {spec!r} is not a folder of them",
            "train some with `llmkit embed train --method word2vec --source shakespeare --out runs/w2v`",
        )
    return load_vectors(spec)


__all__ = ["is_static", "load_vectors", "static_only", "vectors_of"]
