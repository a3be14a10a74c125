"""`llmkit data prepare`: a corpus becomes token shards a trainer can stream.

    source ──► documents ──► normalize ──► de-duplicate ──► split by document ──► tokenize (parallel)
                                                                                   │
        out/train.bin, out/val.bin   one flat array of token ids: doc, eos, doc, eos, ...   ◄──┘
        out/meta.json                tokenizer fingerprint, counts, dtype, source hashes, options
        out/tokenizer.json (+config) the tokenizer, so the folder stands on its own

Ids are uint16 when the vocabulary fits in 65,536, else uint32. Files are written atomically; a
failure leaves no half-written shard.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit import io
from llmkit.data.clean import drop_exact_duplicates, drop_near_duplicates, normalize
from llmkit.data.sources import read_source
from llmkit.data.split import split_documents
from llmkit.errors import LlmkitError
from llmkit.progress import progress
from llmkit.tokenizer.core import Tokenizer

FORMAT_VERSION = 1


def shard_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def tokenize_documents(
    tok: Tokenizer, texts: list[str], *, eos: bool = True, description: str = "tokenize", chunk_bytes: int = 4_000_000
) -> np.ndarray:
    """All `texts` encoded and joined (each followed by the eos token) into one flat id array."""
    add_eos = eos and tok.eos_id is not None
    pieces: list[np.ndarray] = []
    dtype = shard_dtype(tok.vocab_size)
    total = sum(len(t) for t in texts)
    with progress("chars") as bar:
        task = bar.add_task(description, total=total)
        i = 0
        while i < len(texts):
            batch, size = [], 0
            while i < len(texts) and (not batch or size < chunk_bytes):
                batch.append(texts[i])
                size += len(texts[i])
                i += 1
            for ids in tok.encode_batch(batch, add_special_tokens=False, add_eos=add_eos):  # documents joined by eos, nothing else
                pieces.append(np.asarray(ids, dtype=dtype))
            bar.advance(task, size)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _write_shard(path: Path, ids: np.ndarray) -> None:
    with io.atomic_open(path, "wb") as f:
        f.write(ids.tobytes())


@dataclass
class CorpusSplit:
    """A corpus read, normalized, de-duplicated and split by document, once: the tokenizer a run trains and the
    shards it writes both use these very lists, so no validation document ever reaches the tokenizer."""

    train: list[str]
    val: list[str]
    documents_read: int
    exact_duplicates: int
    near_duplicates: int
    replaced_bytes: int
    source_sha256: str
    options: dict


def source_fingerprint(source: str | list[str], field: str = "text") -> str:
    """The SHA-256 of a source's raw texts, as meta.json records it (a changed file under the same path shows)."""
    corpus = read_source(source, field=field)
    return hashlib.sha256("\x00".join(corpus.texts).encode("utf-8")).hexdigest()


def split_corpus(
    source: str | list[str],
    *,
    val_fraction: float = 0.1,
    seed: int = 1337,
    unicode_form: str | None = "NFC",
    newlines: bool = True,
    near_dedup: bool = False,
    near_threshold: float = 0.8,
    field: str = "text",
    log=print,
) -> CorpusSplit:
    """Read `source`, normalize, drop empty and duplicate documents, split train/validation by document."""
    corpus = read_source(source, field=field)
    for w in corpus.warnings:
        log(f"warning: {w}")
    texts = [normalize(t, unicode_form, newlines) for t in corpus.texts]
    texts = [t for t in texts if t.strip()]
    keep, n_exact = drop_exact_duplicates(texts)
    texts = [texts[i] for i in keep]
    n_near = 0
    if near_dedup:
        keep, n_near = drop_near_duplicates(texts, near_threshold)
        texts = [texts[i] for i in keep]
    train, val = split_documents(texts, val_fraction, seed)
    log(
        f"{len(corpus.documents)} documents read, {n_exact} exact and {n_near} near duplicates dropped, "
        f"{len(train)} train / {len(val)} validation units"
    )
    return CorpusSplit(
        train,
        val,
        len(corpus.documents),
        n_exact,
        n_near,
        corpus.replaced_bytes,
        hashlib.sha256("\x00".join(corpus.texts).encode("utf-8")).hexdigest(),
        {
            "val_fraction": val_fraction,
            "seed": seed,
            "unicode_form": unicode_form,
            "newlines": newlines,
            "near_dedup": near_dedup,
            "near_threshold": near_threshold,
            "field": field,
        },
    )


def write_shards(split: CorpusSplit, tok: Tokenizer, out: str | Path, *, source, extra: dict | None = None) -> dict:
    """Tokenize a split into `out/` (train.bin, val.bin, the tokenizer, meta.json last); returns meta.json's contents."""
    start = time.perf_counter()
    train_ids = tokenize_documents(tok, split.train, description="tokenize train")
    val_ids = tokenize_documents(tok, split.val, description="tokenize val")
    if len(train_ids) == 0:
        raise LlmkitError("the training split has no tokens", "give the source more text")
    out = Path(out)
    _write_shard(out / "train.bin", train_ids)
    _write_shard(out / "val.bin", val_ids)
    tok.save(out)
    meta = {
        "format": FORMAT_VERSION,
        "dtype": np.dtype(train_ids.dtype).name,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "train_units": len(split.train),
        "val_units": len(split.val),
        "documents_read": split.documents_read,
        "exact_duplicates_dropped": split.exact_duplicates,
        "near_duplicates_dropped": split.near_duplicates,
        "replaced_invalid_utf8_bytes": split.replaced_bytes,
        "train_bytes": sum(len(t.encode("utf-8")) for t in split.train),
        "val_bytes": sum(len(t.encode("utf-8")) for t in split.val),
        "eos_between_documents": tok.eos_id is not None,
        "tokenizer": {"fingerprint": tok.fingerprint(), "kind": tok.kind, "vocab_size": tok.vocab_size},
        "source": source,
        "source_sha256": split.source_sha256,
        "options": split.options,
        "seconds": round(time.perf_counter() - start, 2),
        **(extra or {}),
    }
    io.write_json(out / "meta.json", meta)  # written last: a folder with meta.json is complete
    return meta


def prepare(
    source: str | list[str],
    tokenizer: str | Tokenizer,
    out: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 1337,
    unicode_form: str | None = "NFC",
    newlines: bool = True,
    near_dedup: bool = False,
    near_threshold: float = 0.8,
    field: str = "text",
    log=print,
) -> dict:
    """Read, clean, split and tokenize `source` into `out/`; returns the `meta.json` contents."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    trained_on = tok.info.get("source")
    same_source = trained_on is not None and sorted([trained_on] if isinstance(trained_on, str) else trained_on) == sorted(
        [source] if isinstance(source, str) else source
    )
    if same_source and val_fraction > 0 and (tok.info.get("val_fraction"), tok.info.get("seed")) != (val_fraction, seed):
        log(
            f"warning: the tokenizer learned from this source with another split (val_fraction {tok.info.get('val_fraction', 0)}, "
            f"seed {tok.info.get('seed')}): validation documents may have shaped it; train it with --val-fraction {val_fraction} "
            f"--seed {seed}"
        )
    split = split_corpus(
        source,
        val_fraction=val_fraction,
        seed=seed,
        unicode_form=unicode_form,
        newlines=newlines,
        near_dedup=near_dedup,
        near_threshold=near_threshold,
        field=field,
        log=log,
    )
    return write_shards(split, tok, out, source=source)
