"""Sentence-embedding throughput: llmkit's `embed_texts` against sentence-transformers' `encode` on the same model
(all-MiniLM-L6-v2, the embedded `minilm`), the same texts and the same batch size, in one run on this machine. Both
mean-pool and normalize; the vectors are checked to agree (cosine >= 0.9999) before the times count.

    python benchmarks/embed_throughput.py                         # 2000 Shakespeare lines, batch 32, 2 threads
    python benchmarks/embed_throughput.py --texts 5000 --batch-size 64 --threads 2
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="best of N runs per engine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    import llmkit
    from llmkit.data.sources import read_source
    from llmkit.embed.contextual import embed_texts
    from llmkit.embedded import embedded_path

    lines = [ln.strip() for t in read_source("shakespeare").texts for ln in t.splitlines() if len(ln.strip()) > 20]
    texts = random.Random(0).sample(lines, args.texts)
    ours = llmkit.load("minilm")
    theirs = SentenceTransformer(str(embedded_path("minilm")), device="cpu")
    a = embed_texts(ours, texts[:200], batch_size=args.batch_size)
    b = theirs.encode(texts[:200], batch_size=args.batch_size, normalize_embeddings=True)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9999, cos.min()
    engines = {
        "llmkit": lambda: embed_texts(ours, texts, batch_size=args.batch_size),
        "sentence-transformers": lambda: theirs.encode(texts, batch_size=args.batch_size, normalize_embeddings=True),
    }
    print(
        f"all-MiniLM-L6-v2, {len(texts)} Shakespeare lines (mean {np.mean([len(t) for t in texts]):.0f} chars), batch {args.batch_size}, "
        f"{args.threads} threads; vectors agree (min cosine {cos.min():.6f})"
    )
    rates = {}
    for name, fn in engines.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates[name] = len(texts) / best
        print(f"{name:<22} {best:6.2f}s  {rates[name]:8.1f} texts/s", flush=True)
    print(f"llmkit / sentence-transformers: {rates['llmkit'] / rates['sentence-transformers']:.2f}x")


if __name__ == "__main__":
    main()
