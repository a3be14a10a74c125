"""Tokenizer encoding throughput: llmkit's `Tokenizer.encode_batch` against the raw `tokenizers` library.

Both encode the same held-out Shakespeare paragraphs in the same process (best of 5); the ratio is
llmkit / tokenizers (1.00 = no overhead). Also times the embedded SmolLM2 tokenizer built from the GGUF.

    python benchmarks/tokenizer_throughput.py [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from llmkit.data.clean import normalize
from llmkit.data.sources import shakespeare
from llmkit.data.split import split_documents
from llmkit.evaluate.tokenizers import measure
from llmkit.tokenizer import KINDS, Tokenizer, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    texts = [normalize(d.text) for d in shakespeare()]
    train, heldout = split_documents(texts, 0.1, 1337)
    paragraphs = [p for doc in heldout for p in doc.split("\n\n") if p.strip()]
    mb = sum(len(p.encode()) for p in paragraphs) / 1e6
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {len(paragraphs)} held-out paragraphs, {mb:.2f} MB")
    print(f"{'tokenizer':<12} {'llmkit MB/s':>12} {'tokenizers MB/s':>16} {'ratio':>7}")
    start = time.perf_counter()
    smol = Tokenizer.load("smollm2")
    load_s = time.perf_counter() - start
    cases = [(kind, train_tokenizer(train, kind, args.vocab_size)) for kind in KINDS] + [("smollm2", smol)]
    for name, tok in cases:
        m = measure(tok, paragraphs, repeats=5)
        print(
            f"{name:<12} {m['encode_mb_s']:>12.2f} {m['raw_tokenizers_mb_s']:>16.2f} {m['encode_mb_s'] / m['raw_tokenizers_mb_s']:>6.2f}x"
        )
    print(f"smollm2 tokenizer built from the GGUF in {load_s:.2f}s")


if __name__ == "__main__":
    main()
