"""Files in and out: atomic writes (a temporary file in the same folder, fsync, then rename: a kill at any moment leaves
either the old file or the new one, never half of one), JSON and JSON Lines, figures, and GGUF files opened for reading.

JSON Lines end at "\n" only (as the format says): a row may hold U+2028, U+0085 or "\r" inside its strings, which
`str.splitlines()` would cut. Every JSONL file llmkit reads or writes goes through `parse_jsonl` / `write_jsonl`.
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


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _temporary_sibling(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, with the permissions a plain `open(path, "w")` would give (mkstemp makes
    it 0600: a model file only its writer could read, which a service such as Ollama's could not open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    fd, tmp = _temporary_sibling(Path(path))
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path of `path` for a writer that opens files by name (the `gguf` writer); renamed over
    `path` only on success, removed on failure."""
    fd, tmp = _temporary_sibling(Path(path))
    os.close(fd)
    try:
        yield Path(tmp)
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


def parse_jsonl(text: str, where: str | os.PathLike, fix: str = "fix that line, or remove it") -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSON Lines `text`; a line that does not parse is an error naming
    `where` and its line."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{where}:{n} is not valid JSON ({e.msg})", fix) from None
    return rows


def read_jsonl(path: str | os.PathLike, fix: str = "fix that line, or remove it") -> list[Any]:
    """The values of a JSON Lines file (UTF-8), blank lines skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        return [row for _, row in parse_jsonl(f.read(), path, fix)]


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """`rows` as JSON Lines, atomically (non-ASCII kept as is)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """One more line (a log that grows: metrics.jsonl)."""
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
