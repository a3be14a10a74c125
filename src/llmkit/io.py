"""Files in and out: atomic writes (a temporary file in the same folder, fsync, then rename: a kill at any moment leaves
either the old file or the new one, never half of one), JSON, figures, and GGUF files opened for reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llmkit.errors import LlmkitError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def open_gguf(path: str | os.PathLike):
    """A GGUF file opened with the `gguf` package (llama.cpp's reader), or an LlmkitError saying it is not one.

    The reader maps the file and cuts every metadata item out of the map; on a `numpy.memmap` each cut runs Python
    code (a vocabulary of 49,152 tokens: 1.1 s of 1.6 s), so the map is read through a plain array view of the same
    memory (no copy; the tensors stay mapped from the file)."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)  # type: ignore[assignment]
            return super()._get(offset, dtype, count, override_order)

    try:
        return Reader(str(path))
    except Exception as e:
        raise LlmkitError(
            f"{path} is not a readable GGUF file ({e})", "the file is corrupt or truncated: re-download or re-install it"
        ) from None
