"""Compare tokenizer kinds on one corpus: train each on the same documents, measure on held-out ones.

fertility       tokens per word (words = whitespace-separated)     lower: fewer steps per sentence
bytes/token     UTF-8 bytes per token (compression)                higher: more text per context
unk rate        share of tokens that are the unknown token         0 for byte-level BPE
vocab used      share of the vocabulary seen in the held-out text
train s         training time
MB/s            encoding throughput through llmkit, and through the raw `tokenizers` library
                on the same texts in the same run (the ratio shows llmkit's overhead)
"""

from __future__ import annotations

import time

from llmkit import io
from llmkit.data.split import split_documents
from llmkit.tokenizer.core import Tokenizer
from llmkit.tokenizer.train import KINDS, train_tokenizer


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(tok: Tokenizer, texts: list[str], repeats: int = 3) -> dict:
    """Fertility, compression, unknown rate, vocabulary use and throughput of `tok` on `texts`."""
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    n_tokens = sum(map(len, encoded))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    unk = tok.unk_id
    n_unk = sum(ids.count(unk) for ids in encoded) if unk is not None else 0
    used = len({i for ids in encoded for i in ids})
    # The raw library's fastest batch path (no offsets), exactly as a user of `tokenizers` would call it.
    raw = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)
    ours_s = _best_of(repeats, lambda: tok.encode_batch(texts, add_special_tokens=False))
    raw_s = _best_of(repeats, lambda: [e.ids for e in raw(texts, add_special_tokens=False)])
    mb = n_bytes / 1e6
    return {
        "tokens": n_tokens,
        "tokens_per_word": n_tokens / max(n_words, 1),
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "unk_rate": n_unk / max(n_tokens, 1),
        "vocab_used": used / tok.vocab_size,
        "encode_mb_s": mb / ours_s,
        "raw_tokenizers_mb_s": mb / raw_s,
    }


def compare(
    texts: list[str], kinds=KINDS, *, vocab_size: int = 8192, val_fraction: float = 0.1, seed: int = 1337, save_dir=None, log=None
) -> list[dict]:
    """Train every kind on the training documents of `texts`; measure each on the held-out ones.

    Returns one row per kind; with `save_dir`, each tokenizer is saved to `save_dir/KIND/`.
    """
    train, heldout = split_documents(texts, val_fraction, seed)
    # Throughput is measured on paragraphs, the unit a data pipeline encodes in parallel.
    paragraphs = [p for doc in heldout for p in doc.split("\n\n") if p.strip()]
    rows = []
    for kind in kinds:
        if log:
            log(f"training {kind} (vocab {vocab_size}) on {len(train)} documents")
        tok = train_tokenizer(train, kind, vocab_size)
        row = {"kind": kind, "vocab_size": tok.vocab_size, "train_seconds": tok.info["train_seconds"]}
        row.update(measure(tok, paragraphs))
        rows.append(row)
        if save_dir is not None:
            tok.save(f"{save_dir}/{kind}")
    return rows


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="tokenizers on held-out text")
    for name in (
        "kind",
        "vocab",
        "tokens/word",
        "bytes/token",
        "unk rate",
        "vocab used",
        "train s",
        "MB/s llmkit",
        "MB/s tokenizers",
        "ratio",
    ):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for r in rows:
        table.add_row(
            r["kind"],
            f"{r['vocab_size']:,}",
            f"{r['tokens_per_word']:.2f}",
            f"{r['bytes_per_token']:.2f}",
            f"{r['unk_rate']:.2%}",
            f"{r['vocab_used']:.1%}",
            f"{r['train_seconds']:.1f}",
            f"{r['encode_mb_s']:.2f}",
            f"{r['raw_tokenizers_mb_s']:.2f}",
            f"{r['encode_mb_s'] / r['raw_tokenizers_mb_s']:.2f}x",
        )
    console.print(table)


def plot(rows: list[dict], path) -> None:
    """One bar chart per measure, the kinds side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [
        ("tokens_per_word", "tokens per word"),
        ("bytes_per_token", "bytes per token"),
        ("unk_rate", "unknown-token rate"),
        ("vocab_used", "share of vocabulary used"),
        ("train_seconds", "training time (s)"),
        ("encode_mb_s", "encoding MB/s"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    kinds = [r["kind"] for r in rows]
    for ax, (key, title) in zip(axes.flat, measures):
        ax.bar(kinds, [r[key] for r in rows], color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("tokenizer kinds compared on held-out text")
    fig.tight_layout()
    io.save_figure(fig, path)
    plt.close(fig)
