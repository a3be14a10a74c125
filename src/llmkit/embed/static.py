"""Static word embeddings: one vector per word, learned from co-occurrence. Word2Vec (gensim, the field's standard)
and GloVe (Pennington et al. 2014, written here in torch: no maintained GloVe package exists).

Both read the corpus the same way, so they compare fairly: lower-cased words (letters, inner apostrophes: "o'er")
per line, a line being a sentence; the vocabulary is every word seen `min_count` times or more, most frequent first.

GloVe, as the reference C implementation computes it:

    co-occurrence   X[i, j] = sum over occurrences of word j within `window` words of word i, on the same line,
                    of 1 / distance (symmetric); built chunk by chunk into a sparse matrix, so the corpus streams
    objective       J = sum over X[i, j] > 0 of f(X[i, j]) (w_i . w~_j + b_i + b~_j - log X[i, j])^2,
                    f(x) = min(1, (x / x_max)^alpha), x_max = 100, alpha = 0.75
    training        AdaGrad (squared sums starting at 1; vector gradients clipped to [-100, 100] and scaled by eta = 0.05,
                    bias gradients unscaled, exactly as the reference steps them), one step per non-zero entry, in one
                    random order (shuffled once, as the reference's `shuffle` does), by lock-free worker threads each
                    over its share (the reference's pthreads); a worker steps a small minibatch of entries at once,
                    sized so that even the most frequent word takes only a few steps from the same stale vectors
    output          w + w~ (the word and context vectors summed)
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmkit import io
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from llmkit.embed.vectors import Vectors

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters of any script, with inner apostrophes: o'er, café
METHODS = ("word2vec", "glove")


def tokenize(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("\u2019", "'"))


def sentences(texts: list[str]) -> list[list[str]]:
    """Every non-empty line of every text, as lower-cased words."""
    return [words for t in texts for line in t.split("\n") if (words := tokenize(line))]


class Lines:
    """A corpus's non-empty lines as lower-cased words, for several passes: `texts` in memory, or a `source` spec
    (files, a folder, a glob; see llmkit.data.sources) streamed one file at a time. A corpus of up to CACHE_TOKENS words
    is kept from the first pass; a larger one is read afresh at each. The first pass also counts the lines and words
    and hashes the text."""

    CACHE_TOKENS = 50_000_000  # a corpus up to this many words is kept after the first pass, not read again

    def __init__(self, texts: list[str] | None = None, source: str | list[str] | None = None, warn=None, field: str = "text"):
        if (texts is None) == (source is None):
            raise ValueError("give texts or a source")
        self.texts, self.source, self.warn, self.field = texts, source, warn, field
        self.lines = self.tokens = 0
        self.sha256 = ""
        self._cache: list[list[str]] | None = None

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        cache: list[list[str]] | None = []
        for words in self._read():
            if cache is not None:
                cache.append(words)
                if self.tokens > self.CACHE_TOKENS:
                    cache = None
            yield words
        self._cache = cache

    def _read(self):
        from llmkit.data.sources import iter_source

        docs = self.texts if self.texts is not None else (d.text for d in iter_source(self.source, field=self.field, warn=self.warn))
        h, lines, tokens = hashlib.sha256(), 0, 0
        for k, text in enumerate(docs):
            h.update(("\x00" if k else "").encode() + text.encode("utf-8"))
            for line in text.split("\n"):
                if words := tokenize(line):
                    lines += 1
                    tokens += len(words)
                    self.tokens = tokens
                    yield words
        self.lines, self.tokens, self.sha256 = lines, tokens, h.hexdigest()


@dataclass
class Vocab:
    words: list[str]
    counts: list[int]

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def build_vocab(lines: Iterable[list[str]], min_count: int = 5, max_size: int | None = None) -> Vocab:
    """Words seen `min_count` times or more, most frequent first (ties alphabetically)."""
    counts = Counter(w for line in lines for w in line)
    if not counts:
        raise LlmkitError("the corpus holds no words", "point --source at files that contain text")
    kept = sorted(((c, w) for w, c in counts.items() if c >= min_count), key=lambda cw: (-cw[0], cw[1]))[:max_size]
    if not kept:
        raise LlmkitError(f"no word occurs {min_count} times or more in the corpus", "lower --min-count or give more text")
    return Vocab([w for _, w in kept], [c for c, _ in kept])


def cooccurrence(lines: Iterable[list[str]], vocab: Vocab, window: int = 10, chunk_tokens: int = 2_000_000):
    """The symmetric GloVe co-occurrence matrix (V, V), scipy CSR float64: each pair of in-vocabulary words at distance
    d <= window on one line adds 1/d to both X[i, j] and X[j, i]. Out-of-vocabulary words are dropped first (as the
    reference does). `lines` may be any iterable (a generator over a corpus larger than memory): they are counted in
    chunks of about `chunk_tokens` words, each added to the sparse total, so memory grows with distinct pairs only."""
    from scipy import sparse

    index = vocab.index
    V = len(vocab.words)
    parts: list = []  # partial sums, merged when two are alike in size (so the work grows as n log n, not n^2)

    def add(chunk: list[list[str]]):
        get = index.get
        ids = np.fromiter((get(w, -1) for line in chunk for w in line), dtype=np.int64)
        line_of = np.repeat(np.arange(len(chunk)), [len(line) for line in chunk])
        known = ids >= 0  # out-of-vocabulary words go before the window is counted
        ids, line_of = ids[known], line_of[known]
        rows, cols, vals = [], [], []
        for d in range(1, window + 1):
            same = line_of[d:] == line_of[:-d]  # the pairs d words apart on one line
            if not same.any():
                break
            rows.append(ids[d:][same])
            cols.append(ids[:-d][same])
            vals.append(np.full(int(same.sum()), 1.0 / d))
        if rows:  # one direction counted; the matrix is symmetric
            half = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(V, V)).tocsr()
            parts.append(half + half.T)
            while len(parts) > 1 and parts[-2].nnz <= 2 * parts[-1].nnz:
                last = parts.pop()
                parts[-1] = parts[-1] + last

    chunk, seen = [], 0
    for line in lines:
        chunk.append(line)
        seen += len(line)
        if seen >= chunk_tokens:
            add(chunk)
            chunk, seen = [], 0
    add(chunk)
    total = sparse.csr_matrix((V, V), dtype=np.float64)
    for part in parts:
        total = total + part
    total.sum_duplicates()
    return total


def glove_batch_size(X, concurrent_steps: float = 6.0) -> int:
    """Entries per minibatch such that the busiest word row takes about `concurrent_steps` steps at once: a batch's
    steps all start from the same vectors, and a frequent word ("the") stepped a hundred times on stale vectors
    overshoots where the reference, one entry at a time, would not. Between 64 and 4,096."""
    coo = X.tocoo()
    busiest = max(np.bincount(coo.row).max(), np.bincount(coo.col).max()) / max(coo.nnz, 1)
    return int(min(4096, max(64, concurrent_steps / busiest)))


def _earlier_in_batch(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each entry, the sum of `values` of the entries before it in the batch with the same row: what the
    reference's squared sums would have gained from them when it reaches this entry."""
    order = torch.argsort(rows, stable=True)
    r, v = rows[order], values[order]
    total = v.cumsum(0) - v  # exclusive running sums
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(r), device=r.device), 0), 0).values  # each one's group start
    out = torch.empty_like(values)
    out[order] = total - total[start]
    return out


def glove(
    X,
    dim: int = 100,
    *,
    epochs: int = 25,
    x_max: float = 100.0,
    alpha: float = 0.75,
    eta: float = 0.05,
    batch_size: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress=None,
) -> tuple[np.ndarray, list[float]]:
    """Train GloVe on the co-occurrence matrix `X` (V, V); returns (word + context vectors (V, dim), loss per epoch).

    Like the reference, `threads` workers (default: 2 on a CPU, as many as PyTorch's threads up to 2; 1 on a GPU)
    each take a contiguous share of the shuffled entries and step the shared parameters without locks (when each has
    50 minibatches or more); each steps `batch_size` entries at once (default: `glove_batch_size`). One thread is
    deterministic in `seed`.
    `progress(epoch, loss)` is called after each epoch."""
    import threading

    coo = X.tocoo()
    V = X.shape[0]
    if coo.nnz == 0:
        raise LlmkitError("no word co-occurs with another within the window", "give more text, a larger --window or a lower --min-count")
    device = torch.device(device)
    batch_size = batch_size or glove_batch_size(X)
    threads = threads or (min(2, torch.get_num_threads()) if device.type == "cpu" else 1)
    g = torch.Generator().manual_seed(seed)
    # one row per word and per context word (rows V..2V-1): its vector, then its bias, as the reference lays them out
    W = ((torch.rand(2 * V, dim + 1, generator=g) - 0.5) / dim).to(device)
    sq = torch.ones(2 * V, dim + 1, device=device)  # AdaGrad's squared-gradient sums; the first step is eta
    order = torch.randperm(coo.nnz, generator=g)  # shuffled once, as the reference's `shuffle` does
    pairs = torch.from_numpy(np.stack([coo.row, coo.col + V], 1).astype(np.int64))[order].to(device)
    x = torch.from_numpy(coo.data).to(torch.float32)[order].to(device)
    log_x, weight = x.log(), (x / x_max).pow(alpha).clamp(max=1.0)

    def run(lo: int, hi: int, out: list, first_epoch: bool) -> None:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(lo, hi, batch_size):
            end = min(start + batch_size, hi)
            n = end - start
            ij = pairs[start:end].T.reshape(-1)  # (2n,): the words, then their context words
            rows = W.index_select(0, ij)  # (2n, dim + 1)
            wi, wj = rows[:n], rows[n:]
            diff = torch.linalg.vecdot(wi[:, :dim], wj[:, :dim]) + wi[:, dim] + wj[:, dim] - log_x[start:end]  # (n,)
            fdiff = weight[start:end] * diff
            total += (fdiff @ diff).double() / 2
            # each entry takes its own AdaGrad step against the squared sums as they stood when its minibatch began;
            # the steps of one row add up. Row m of `grad` is the gradient of its partner's row: d/dw_i = fdiff w_j,
            # d/dw_j = fdiff w_i (clipped to [-100, 100], times eta), d/db = fdiff (neither clipped nor times eta)
            fdiff = fdiff.repeat(2)[:, None]
            grad = rows.mul_(fdiff).clamp_(-100, 100).mul_(eta)
            grad[:, dim] = fdiff[:, 0]
            target = ij.view(2, n).flip(0).reshape(-1)
            denom = sq.index_select(0, target)
            if first_epoch:  # the biases' squared sums start at 1 and their steps are not scaled by eta: while they
                # are small, count what the batch's earlier steps of the same row added (the reference's would have)
                denom[:, dim] += _earlier_in_batch(target, fdiff[:, 0] ** 2)
            W.index_add_(0, target, denom.rsqrt_().mul_(grad), alpha=-1)
            sq.index_add_(0, target, grad.mul_(grad))
        out.append(float(total))

    intra = torch.get_num_threads()
    if coo.nnz < threads * 50 * batch_size:  # too few entries to share: the workers would step on each other's rows
        threads = 1
    losses = []
    try:
        for epoch in range(epochs):
            n_workers = threads
            torch.set_num_threads(intra if n_workers == 1 else 1)  # each worker one core, as the reference's pthreads
            totals: list[float] = []
            bounds = [coo.nnz * k // n_workers for k in range(n_workers + 1)]
            if n_workers == 1:
                run(0, coo.nnz, totals, epoch == 0)
            else:
                workers = [
                    threading.Thread(target=run, args=(bounds[k], bounds[k + 1], totals, epoch == 0), daemon=True) for k in range(n_workers)
                ]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                if len(totals) != n_workers:
                    raise LlmkitError("a GloVe worker thread failed", "run again with threads=1 to see its error")
            losses.append(sum(totals) / coo.nnz)
            if not math.isfinite(losses[-1]):
                raise LlmkitError(
                    f"GloVe's loss became {losses[-1]} in epoch {epoch + 1}", "lower the learning rate eta (and check the corpus)"
                )
            if progress is not None:
                progress(epoch + 1, losses[-1])
    finally:
        torch.set_num_threads(intra)
    return (W[:V, :dim] + W[V:, :dim]).cpu().numpy(), losses


def word2vec(
    lines,
    vocab: Vocab,
    dim: int = 100,
    *,
    window: int = 5,
    epochs: int = 5,
    sg: bool = True,
    negative: int = 5,
    sample: float = 1e-3,
    seed: int = 0,
    workers: int = 2,
    progress=None,
) -> np.ndarray:
    """gensim's Word2Vec (skip-gram or CBOW, negative sampling, subsampling) on the same lines and vocabulary as GloVe;
    returns the vectors in the vocabulary's order. `lines` may be re-iterable (`Lines`); `workers=1` is reproducible
    in `seed` (more workers race, as gensim documents)."""
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    class Report(CallbackAny2Vec):
        def __init__(self):
            self.epoch = 0

        def on_epoch_end(self, model):
            self.epoch += 1
            if progress is not None:
                progress(self.epoch, model.get_latest_training_loss())

    model = Word2Vec(
        vector_size=dim,
        window=window,
        min_count=1,
        sg=int(sg),
        negative=negative,
        sample=sample,
        seed=seed,
        workers=workers,
        compute_loss=True,
    )
    keep = set(vocab.words)

    class Kept:  # the lines with out-of-vocabulary words dropped, re-read each epoch
        def __iter__(self):
            return ([w for w in line if w in keep] for line in lines)

    model.build_vocab_from_freq(dict(zip(vocab.words, vocab.counts)))
    total = getattr(lines, "lines", 0) or sum(1 for _ in lines)
    model.train(Kept(), total_examples=total, epochs=epochs, callbacks=[Report()])
    return np.stack([model.wv[w] for w in vocab.words])


def train(
    texts: list[str] | None = None,
    method: str = "word2vec",
    *,
    source: str | list[str] | None = None,
    dim: int = 100,
    window: int | None = None,
    epochs: int | None = None,
    min_count: int = 5,
    max_vocab: int | None = None,
    sg: bool = True,
    seed: int = 0,
    workers: int = 2,
    device: str = "cpu",
    field: str = "text",
    log=print,
) -> Vectors:
    """Static vectors of `method` (word2vec or glove) trained on `texts`, or on a `source` spec read file by file (a
    corpus larger than memory streams: one pass counts the vocabulary, the next the co-occurrences or the training);
    with their training facts in `.meta`. `device` places GloVe's training (cuda runs it on a GPU)."""
    from llmkit.embed.vectors import Vectors
    from llmkit.progress import progress

    if method not in METHODS:
        raise LlmkitError(f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    if not 50 <= dim <= 1024:
        raise LlmkitError(f"dimension {dim} is out of range", "use --dim between 50 and 1024")
    window = (10 if method == "glove" else 5) if window is None else window
    epochs = (25 if method == "glove" else 5) if epochs is None else epochs
    for name, value in (("--window", window), ("--epochs", epochs), ("--min-count", min_count)):
        if value < 1:
            raise LlmkitError(f"{name} {value} is less than 1", f"give {name} of 1 or more")
    start = time.perf_counter()
    lines = Lines(
        texts, source, warn=lambda path, bad: log(f"warning: {path}: {bad} invalid UTF-8 byte(s) replaced by U+FFFD"), field=field
    )
    vocab = build_vocab(lines, min_count, max_vocab)
    log(f"{lines.tokens:,} words in {lines.lines:,} lines; vocabulary of {len(vocab.words):,} (seen {min_count}+ times)")
    losses = []
    with progress("epochs") as bar:
        task = bar.add_task(method, total=epochs)

        def report(epoch, loss):
            losses.append(float(loss))
            bar.update(task, completed=epoch, description=f"{method} loss {loss:,.4g}")

        if method == "glove":
            X = cooccurrence(lines, vocab, window)
            log(f"co-occurrence matrix: {X.nnz:,} non-zero entries")
            matrix, _ = glove(X, dim, epochs=epochs, seed=seed, device=device, progress=report)
        else:
            matrix = word2vec(lines, vocab, dim, window=window, epochs=epochs, sg=sg, seed=seed, workers=workers, progress=report)
    meta = {
        "method": method,
        "dim": dim,
        "window": window,
        "epochs": epochs,
        "min_count": min_count,
        "sg": sg if method == "word2vec" else None,
        "corpus_sha256": lines.sha256,
        "tokens": lines.tokens,
        "lines": lines.lines,
        "vocab_size": len(vocab.words),
        "seconds": round(time.perf_counter() - start, 2),
        "loss": losses,
    }
    return Vectors(vocab.words, matrix.astype(np.float32), counts=vocab.counts, meta=meta)


def load_static(path: str | Path):
    from llmkit.embed.vectors import Vectors

    path = Path(path)
    if not (path / "vectors.npy").exists() or not (path / "vocab.json").exists():
        raise LlmkitError(f"{path} holds no static vectors (vectors.npy + vocab.json)", "train some with `llmkit embed train`")
    vocab = io.read_json(path / "vocab.json")
    matrix = np.load(path / "vectors.npy", allow_pickle=False)
    if matrix.shape[0] != len(vocab["words"]):
        raise LlmkitError(f"{path}: {matrix.shape[0]} vectors for {len(vocab['words'])} words", "train the vectors again")
    if not (path / "meta.json").exists():
        raise LlmkitError(f"{path} has no meta.json: its writing did not finish", "train the vectors again")
    meta = io.read_json(path / "meta.json")
    if meta.get("vocab_size", len(vocab["words"])) != len(vocab["words"]) or meta.get("dim", matrix.shape[1]) != matrix.shape[1]:
        raise LlmkitError(
            f"{path}: meta.json says {meta.get('vocab_size')} words x {meta.get('dim')}, the files hold "
            f"{len(vocab['words'])} x {matrix.shape[1]}",
            "train the vectors again",
        )
    return Vectors(vocab["words"], matrix, counts=vocab.get("counts"), meta=meta)
