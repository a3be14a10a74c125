"""Windows of tokens from a prepared shard folder: random ones for training, sequential ones for evaluation.

Training windows are a pure function of (seed, step, global batch size): the global batch of `batch_size * world_size * accum` rows
is drawn the same way on every rank, and micro-step m of rank r takes its own `batch_size` rows. So a run on N
processes, or with gradient accumulation, sees exactly the rows of a run on one process with one big batch, and a
resumed run continues from its step with nothing to restore.

Two ways to draw them (`sampling`):
    random    each row starts anywhere, independently (nanoGPT's get_batch): over two epochs' worth of rows a
              token is seen Poisson(2) times: 13.5% never, 14% four times or more
    shuffle   epochs: the shard cut into windows `stride` apart from a random offset, every window once per epoch in
              a random order (a DataLoader with shuffle=True over the windows); each epoch its own offset and order,
              so the cuts move and the shard's first and last tokens are in windows too

    global batch at step s   [row 0 | row 1 | row 2 | row 3]      (world_size 2, batch_size 2, accum 1)
                              rank 0 ^^^^^^^^^  rank 1 ^^^^^^^^^
                             [row 0 | row 1 | row 2 | row 3]      (world_size 1, batch_size 2, accum 2)
                              micro 0 ^^^^^^^^  micro 1 ^^^^^^^^^
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmkit import io
from llmkit.errors import LlmkitError


def load_meta(data_dir: str | Path) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.exists():
        raise LlmkitError(
            f"{data_dir} has no meta.json: it is not a prepared shard folder (or its preparation did not finish)",
            "run `llmkit data prepare --source ... --tokenizer ... --out DIR` first",
        )
    return io.read_json(meta_path)


def open_shard(data_dir: str | Path, split: str) -> np.ndarray:
    """The shard `split` ('train' or 'val') as a read-only memory map, checked against meta.json."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise LlmkitError(f"{path} is missing", "run `llmkit data prepare` again into this folder")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise LlmkitError(
            f"{path} holds {path.stat().st_size} bytes, meta.json says {expected}: the shard is corrupt or from another run",
            "run `llmkit data prepare` again into this folder",
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_tokenizer(meta: dict, tokenizer) -> None:
    """Refuse shards made with another tokenizer than the one the model will use."""
    want = meta["tokenizer"]["fingerprint"]
    if tokenizer.fingerprint() != want:
        raise LlmkitError(
            f"the shards were made with tokenizer {want} ({meta['tokenizer']['kind']}, vocab {meta['tokenizer']['vocab_size']}), "
            f"not with this one ({tokenizer.fingerprint()}, {tokenizer.kind}, vocab {tokenizer.vocab_size})",
            "prepare the data again with this tokenizer, or use the tokenizer saved in the shard folder",
        )


SAMPLINGS = ("shuffle", "random")  # how training windows are drawn (the module docstring)
_SHUFFLE_STREAM = 0x5348  # the spawn key that tells the epochs' random streams apart


class WindowLoader:
    """(batch_size, window) int64 tensors of consecutive token ids from one shard.

    `batch(step)` is random and reproducible; `sequential()` walks the shard in order for evaluation.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        *,
        window: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        tokenizer=None,
        sampling: str = "random",
        stride: int | None = None,
    ):
        self.meta = load_meta(data_dir)
        if tokenizer is not None:
            check_tokenizer(self.meta, tokenizer)
        self.data = open_shard(data_dir, split)
        self.split, self.window, self.batch_size, self.seed = split, window, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if sampling not in SAMPLINGS:
            raise LlmkitError(f"unknown sampling {sampling!r}", f"use {' or '.join(SAMPLINGS)}")
        if stride is not None and stride < 1:
            raise LlmkitError(f"the window stride is {stride}", "use a stride of at least 1 token")
        self.sampling, self.stride = sampling, stride or window
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, order) of the last epoch drawn
        if len(self.data) < window:
            raise LlmkitError(
                f"the {split} shard has {len(self.data)} tokens, fewer than one window of {window}",
                "use a shorter window (--block-size) or more data",
            )

    def batch(self, step: int, micro: int = 0, accum: int = 1) -> torch.Tensor:
        """This rank's rows of micro-step `micro` (of `accum`) of the global batch for `step`."""
        return self.rows(step, micro, accum)[0]

    def rows(self, step: int, micro: int = 0, accum: int = 1) -> tuple[torch.Tensor, list[int]]:
        """(this rank's (B, window) rows of micro-step `micro` at `step`, their indices in the global batch)."""
        size = self.batch_size * self.world_size * accum
        first = (micro * self.world_size + self.rank) * self.batch_size
        if self.sampling == "shuffle":
            starts = [self._shuffled_start(step * size + i) for i in range(first, first + self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, step])
            starts = list(rng.integers(0, len(self.data) - self.window + 1, size=size)[first : first + self.batch_size])
        rows = np.stack([self.data[s : s + self.window] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows), list(range(first, first + self.batch_size))  # (B, window)

    def windows_per_epoch(self) -> int:
        """Windows of one shuffled epoch: as many as fit after any offset below `stride`."""
        return max(1, (len(self.data) - self.window + 1) // self.stride)

    def _shuffled_start(self, row: int) -> int:
        """Start of global row `row` (counted from step 0) under `shuffle`: epoch row // n, its window order[row % n]."""
        n = self.windows_per_epoch()
        epoch = row // n
        if self._epoch is None or self._epoch[0] != epoch:
            # a stream of its own: no (seed, step, row) key of the random sampler or of the objectives' masks draws it
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_SHUFFLE_STREAM, epoch)))
            slack = len(self.data) - self.window - (n - 1) * self.stride  # offsets 0..slack keep the last window whole
            self._epoch = (epoch, int(rng.integers(0, slack + 1)), rng.permutation(n))
        _, offset, order = self._epoch
        return offset + int(order[row % n]) * self.stride

    def sequential(self, stride: int | None = None, max_windows: int | None = None):
        """Windows from the start of the shard, `stride` apart (default: no overlap), this rank's share,
        `batch_size` at a time. Yields (b, window) tensors; the last batch may be smaller."""
        stride = stride or self.window
        starts = list(range(0, len(self.data) - self.window + 1, stride))[:max_windows]
        mine = starts[self.rank :: self.world_size]
        for i in range(0, len(mine), self.batch_size):
            rows = [self.data[s : s + self.window] for s in mine[i : i + self.batch_size]]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
