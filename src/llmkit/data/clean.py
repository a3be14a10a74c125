"""Normalization and de-duplication of documents before tokenization.

Exact duplicates are found by hashing the normalized text. Near-duplicates (optional) by MinHash over
word 5-gram shingles with locality-sensitive hashing (`datasketch`): LSH proposes documents kept earlier that
may be similar, and a document is dropped only when its true Jaccard similarity (of the shingle sets) to one
of them reaches the threshold (LSH alone also proposes some that are not).
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalize(text: str, form: str | None = "NFC", newlines: bool = True) -> str:
    """Unicode normalization (`NFC`, `NFKC`, ... or None) and `\\r\\n` / `\\r` line endings to `\\n`."""
    if newlines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if form:
        text = unicodedata.normalize(form, text)
    return text


def drop_exact_duplicates(texts: list[str]) -> tuple[list[int], int]:
    """Indices of the first copy of each distinct text, and how many copies were dropped."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        h = hashlib.sha256(t.encode("utf-8")).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return keep, len(texts) - len(keep)


def drop_near_duplicates(
    texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1
) -> tuple[list[int], int]:
    """Indices of the texts kept after MinHash-LSH near-duplicate removal, and how many were dropped."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    keep, shingles = [], {}
    for i, t in enumerate(texts):
        words = t.split()
        grams = {" ".join(words[j : j + shingle]) for j in range(max(1, len(words) - shingle + 1))}
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([g.encode("utf-8") for g in grams])
        hashed = {hash(g) for g in grams}
        if any(len(hashed & shingles[c]) / len(hashed | shingles[c]) >= threshold for c in lsh.query(m)):
            continue
        lsh.insert(str(i), m)
        shingles[str(i)] = hashed
        keep.append(i)
    return keep, len(texts) - len(keep)
