"""Contextual embeddings: a vector per text, or per word in its sentence, from any model `llmkit.load` gives.

    pooling   mean   the mean of the real tokens' final hidden states (encoders' default; with normalization this is
                     exactly what sentence-transformers computes for all-MiniLM-L6-v2)
              cls    the first token's state (BERT's [CLS]; a model without a [CLS] token has none)
              last   the last real token's state (decoders' default: the only one that has seen the whole text)
              max    the largest value of each dimension over the real tokens

A sentence-transformers folder's own rules come first: its pooling and its `max_seq_length` (256 for MiniLM, not the
model's 512 positions). Texts are encoded with the model's own special tokens, cut to that length, sorted by length and
embedded in batches (right padding, an attention mask), then put back in their order. A word's vector in a sentence is
the mean of the states of the tokens its characters span (sub-words averaged), so "bank" by a river and "bank" with a
loan get different vectors.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.model.layers import POOLINGS, pad_right, pool
from llmkit.progress import progress as bar_of


def default_pooling(model) -> str:
    """The model's own rule (a sentence-transformers Pooling module), else last for decoders and mean otherwise."""
    rule = (getattr(model, "sentence_config", None) or {}).get("pooling")
    return rule or ("last" if model.config.family == "decoder" else "mean")


def input_limit(model) -> int:
    """The longest input in tokens: a sentence-transformers folder's max_seq_length, else the model's positions."""
    rule = (getattr(model, "sentence_config", None) or {}).get("max_seq_length")
    return int(rule) if rule else (model.config.max_seq_len if model.config.position != "relative" else 512)


def check_pooling(model, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise LlmkitError(f"unknown pooling {pooling!r}", f"use one of: {', '.join(POOLINGS)}")
    if pooling == "cls":
        if model.config.family == "decoder":
            raise LlmkitError(
                "cls pooling takes the first token, which in a decoder has seen nothing but itself",
                "use --pooling last (or mean) for decoders",
            )
        first = model.tokenizer.encode("a")[:1] if model.tokenizer is not None else []
        if not first or first[0] not in model.tokenizer.special_ids:
            raise LlmkitError(
                "cls pooling needs a [CLS] token at the start of every input, and this model's tokenizer adds none", "use --pooling mean"
            )


def _states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, D) of any family (an encoder-decoder's encoder)."""
    family = model.config.family
    if family == "encoder":
        return model.hidden_states(ids, mask)[0]
    if family == "decoder":
        return model.hidden_states(ids, mask)[0]
    return model.encode(ids, mask)[0]


@torch.no_grad()
def embed_texts(
    model,
    texts: list[str],
    *,
    pooling: str | None = None,
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, D) vectors of `texts` in their order."""
    if not texts:
        raise LlmkitError("there is no text to embed", "give one text or more")
    tok = model.tokenizer
    if tok is None:
        raise LlmkitError("the model has no tokenizer", "load a model folder that holds tokenizer.json")
    pooling = pooling or default_pooling(model)
    check_pooling(model, pooling)
    limit = max_length or input_limit(model)
    encoded = [tok.encode(t, max_length=limit) for t in texts]
    return embed_ids(model, encoded, pooling=pooling, normalize=normalize, batch_size=batch_size, progress=progress)


@torch.no_grad()
def embed_ids(
    model, encoded: list[list[int]], *, pooling: str | None = None, normalize: bool = True, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """(N, D) vectors of token-id inputs (already encoded, special tokens included) in their order."""
    tok = model.tokenizer
    pooling = pooling or default_pooling(model)
    check_pooling(model, pooling)
    if any(not e for e in encoded):
        raise LlmkitError("a text encodes to no token", "give every text some words")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out = np.zeros((len(encoded), model.config.d_model), dtype=np.float32)
    device = next(model.parameters()).device
    with bar_of("texts", disable=None if progress else True) as bar:
        task = bar.add_task("embed", total=len(encoded))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = pad_right([encoded[i] for i in chunk], tok.pad_id or 0, device)
            states = _states(model, ids, mask).float()  # (B, T, D)
            vec = pool(states, mask, pooling)
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out[chunk] = vec.cpu().numpy()
            bar.advance(task, len(chunk))
    return out


@torch.no_grad()
def word_vectors(model, sentences: list[str], word: str) -> list[tuple[str, np.ndarray]]:
    """The vector of `word` (every occurrence, sub-tokens averaged) in each sentence: [(sentence, (D,) vector), ...]."""
    tok = model.tokenizer
    device = next(model.parameters()).device
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    out = []
    for s in sentences:
        spans = [m.span() for m in pattern.finditer(s)]
        if not spans:
            raise LlmkitError(f"the word {word!r} is not in the sentence {s!r}", "give sentences that contain the word")
        enc = tok.backend.encode(s, add_special_tokens=True)
        if len(enc.ids) > input_limit(model):
            raise LlmkitError(
                f"the sentence {s[:40]!r}... is {len(enc.ids)} tokens, longer than the model's {input_limit(model)}",
                "give shorter sentences",
            )
        picked = [t for t, (a, b) in enumerate(enc.offsets) if b > a and any(a < e and b > st for st, e in spans)]
        if not picked:
            raise LlmkitError(f"no token of {s!r} covers the word {word!r}", "check the word's spelling in the sentence")
        ids, mask = pad_right([enc.ids], tok.pad_id or 0, device)
        states = _states(model, ids, mask)[0].float()  # (T, D)
        out.append((s, states[picked].mean(0).cpu().numpy()))
    return out


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True).clip(min=1e-12)
    return unit @ unit.T
