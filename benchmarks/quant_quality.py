"""The quality cost of each weight format: perplexity of SmolLM2-135M-Instruct on Hamlet in 512-token windows, llmkit's
fp32 / bf16 / int8 / int4 against llama.cpp on the same GGUF (its Q4_1 weights, `llama-cpp-python`, if installed).

    python benchmarks/quant_quality.py                  # the whole play (about 45,000 tokens; minutes on 2 cores)
    python benchmarks/quant_quality.py --max-tokens 8192

Windows do not overlap (stride = window): each scores every token but its first, as llama.cpp's `llama-perplexity`
does with its second half only; the same windows are scored by every engine, so the numbers compare.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import llmkit
from llmkit.data.sources import shakespeare
from llmkit.evaluate.perplexity import score_tokens


def llama_cpp_nats(path: str, ids: list[int], window: int, threads: int) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=window, n_threads=threads, n_batch=window, logits_all=True, verbose=False)
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk[:-1])
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)  # (n-1, V)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return nats, count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="fp32,bf16,int8,int4")
    p.add_argument("--skip-llama-cpp", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = llmkit.load("smollm2")
    ids = base.tokenizer.encode(shakespeare("hamlet")[0].text)
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    print(f"SmolLM2-135M-Instruct on Hamlet: {len(ids):,} tokens, {args.window}-token windows, {args.threads} threads")
    results = {}
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        model = llmkit.load("smollm2", dtype=torch.bfloat16 if fmt == "bf16" else None, quantize=fmt if fmt in ("int8", "int4") else None)
        nats, count = score_tokens(model, ids, args.window + 1, args.window, batch_size=4)
        results[f"llmkit {fmt}"] = math.exp(nats / count)
        print(
            f"llmkit {fmt:<5} perplexity {results[f'llmkit {fmt}']:.3f}  ({count:,} tokens, {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if not args.skip_llama_cpp:
        try:
            from llmkit.embedded import embedded_path

            start = time.perf_counter()
            nats, count = llama_cpp_nats(str(embedded_path("smollm2")), ids, args.window + 1, args.threads)
            results["llama.cpp Q4_1"] = math.exp(nats / count)
            print(f"llama.cpp Q4_1 perplexity {results['llama.cpp Q4_1']:.3f}  ({count:,} tokens, {time.perf_counter() - start:.0f} s)")
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (a benchmark extra; see benchmarks/RESULTS.md)")
    if "llmkit fp32" in results:
        print("\ncost against fp32 (perplexity points):")
        for name, ppl in results.items():
            print(f"  {name:<16} {ppl:.3f}  {ppl - results['llmkit fp32']:+.3f}")


if __name__ == "__main__":
    main()
