"""Semantic search: a source cut into passages, each embedded by a model, in a FAISS index (inner product on unit
vectors, i.e. cosine; an IVF index for large collections, chosen by size); a query is embedded the same way and the
nearest passages come back with their source and score.

    index folder   index.faiss, vectors.npy, passages.jsonl (text, source, document hash), meta.json (model, pooling,
                   chunking, source, per-document hashes)

Rebuilding into the same folder is incremental: documents whose text hash is unchanged keep their vectors; only new
or changed documents are embedded again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model.weights import load as load_model

# passages: from here an IVF index (sqrt(n) lists, 32 probed) instead of an exact flat one. IVF is approximate (it can
# miss a passage the exact search finds), and exact search is fast well beyond a book: 12 ms a query over 200,000
# MiniLM vectors on one core, 1.7 ms over all of Shakespeare's ~30,000 4-line passages
IVF_FROM = 200_000


def chunk(text: str, spec: str) -> list[str]:
    """Passages of a text: `4lines` (every 4 non-empty lines), `200words`, or `paragraph` (blank-line separated)."""
    m = re.fullmatch(r"(\d+)(lines?|words?)", spec.strip().lower())
    if spec == "paragraph":
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not m or int(m.group(1)) < 1:
        raise LlmkitError(f"cannot read the chunking {spec!r}", "use e.g. 4lines, 200words or paragraph")
    n = int(m.group(1))
    if m.group(2).startswith("line"):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return ["\n".join(lines[i : i + n]) for i in range(0, len(lines), n)]
    words = text.split()
    return [" ".join(words[i : i + n]) for i in range(0, len(words), n)]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _faiss_index(vectors: np.ndarray, ivf_from: int = IVF_FROM):
    import faiss

    n, d = vectors.shape
    if n < ivf_from:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = 32
    index.add(vectors)
    return index


def _previous(out: Path, settings: dict) -> dict[str, tuple[list[str], np.ndarray]]:
    """What an earlier index in `out` can lend, by document text hash: (passages, vectors), when it was built with the
    same model weights, pooling and chunking and its files agree; else nothing."""
    if not (out / "meta.json").exists() or not (out / "vectors.npy").exists() or not (out / "passages.jsonl").exists():
        return {}
    meta = io.read_json(out / "meta.json")
    if any(meta.get(k) != v for k, v in settings.items()):
        return {}
    vectors = np.load(out / "vectors.npy", allow_pickle=False)
    rows = io.read_jsonl(out / "passages.jsonl")
    if len(rows) != len(vectors) or len(rows) != meta.get("passages"):
        return {}
    blocks: list[tuple[tuple, list[int]]] = []  # one block of rows per document, as they were written
    for k, row in enumerate(rows):
        key = (row["doc"], row["source"])
        if not blocks or blocks[-1][0] != key:
            blocks.append((key, []))
        blocks[-1][1].append(k)
    found = {}
    for (h, _), members in blocks:
        found.setdefault(h, ([rows[k]["text"] for k in members], vectors[members]))
    return found


def build_index(
    model_name: str,
    source,
    out: str | Path,
    *,
    chunking: str = "4lines",
    pooling: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    log=print,
) -> dict:
    """Index `source` (any --source form) into `out`, embedding on `device`; returns meta.json's contents."""
    import faiss

    from llmkit.data.sources import read_source
    from llmkit.embed.contextual import default_pooling, embed_texts
    from llmkit.model.weights import weights_fingerprint

    out = Path(out)
    corpus = read_source(source)
    model = load_model(model_name, device=device)
    pooling = pooling or default_pooling(model)
    fingerprint = weights_fingerprint(model)
    reuse = _previous(out, {"model": str(model_name), "weights": fingerprint, "pooling": pooling, "chunking": chunking})
    rows, vectors, embedded, kept = [], [], 0, 0
    for doc in corpus.documents:
        h = _hash(doc.text)
        name = doc.meta.get("play", doc.name)
        if h in reuse:  # the same text embedded before (under this name or another): its passages and vectors
            texts, vecs = reuse[h]
            kept += len(texts)
        else:
            texts = chunk(doc.text, chunking)
            if not texts:
                continue
            vecs = embed_texts(model, texts, pooling=pooling, batch_size=batch_size, progress=True)
            embedded += len(texts)
        rows += [{"text": t, "source": name, "doc": h} for t in texts]
        vectors.append(vecs)
    if not rows:
        raise LlmkitError(f"the source {source} gives no passage", "check --source and --chunk")
    matrix = np.concatenate(vectors).astype(np.float32)
    index = _faiss_index(matrix)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # until the new meta.json lands, the folder is not an index
    with io.atomic_open(out / "vectors.npy", "wb") as f:
        np.save(f, matrix, allow_pickle=False)
    io.write_jsonl(out / "passages.jsonl", rows)
    with io.atomic_open(out / "index.faiss", "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    meta = {
        "model": str(model_name),
        "weights": fingerprint,
        "pooling": pooling,
        "chunking": chunking,
        "source": source,
        "passages": len(rows),
        "dim": int(matrix.shape[1]),
        "index": type(index).__name__,
        "embedded": embedded,
        "reused": kept,
    }
    io.write_json(out / "meta.json", meta)  # last: a folder with meta.json is complete
    log(f"{len(rows):,} passages ({embedded:,} embedded, {kept:,} kept from the previous index) -> {out}")
    return meta


class SearchIndex:
    def __init__(self, folder: str | Path):
        import faiss

        folder = Path(folder)
        if not (folder / "meta.json").exists():
            raise LlmkitError(f"{folder} is not a search index (no meta.json)", "build one with `llmkit embed index`")
        self.meta = io.read_json(folder / "meta.json")
        self.rows = io.read_jsonl(folder / "passages.jsonl")
        self.index = faiss.deserialize_index(np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8))
        self.model = load_model(self.meta["model"])

    def search(self, query: str, top: int = 5) -> list[dict]:
        from llmkit.embed.contextual import embed_texts

        if not query.strip():
            raise LlmkitError("the query is empty", "type what to look for")
        q = embed_texts(self.model, [query], pooling=self.meta["pooling"])
        if q.shape[1] != self.index.d:
            raise LlmkitError(
                f"the query's vector has {q.shape[1]} dimensions, the index's {self.index.d}",
                f"search with the model the index was built with ({self.meta['model']}), or rebuild the index",
            )
        scores, ids = self.index.search(q, min(top, len(self.rows)))
        return [{**self.rows[i], "score": float(s)} for s, i in zip(scores[0], ids[0]) if i >= 0]
