"""A running stream's worst gap between two tokens while a long prompt joins the batch: the engine's chunked prefill
(`--prefill-chunk`) against prefilling the prompt at once, in the same run.

    python benchmarks/prefill_gap.py                       # SmolLM2, a 3,000-token prompt, chunks of 128/256/512 and none
    python benchmarks/prefill_gap.py --prompt-tokens 2000 --chunks 256,0

One greedy stream runs (64 tokens); once it has produced 8 tokens a second request with a long prompt (the first
plays of Shakespeare, tokenized) is submitted. Reported per setting: the stream's median gap between tokens before the
long prompt came (a decode step), its worst gap while the prompt was prefilled, the ratio of the two, and the long
request's time to first token. The engine decodes eagerly (the compiled step would only shorten the steps).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import llmkit
from llmkit.data.sources import shakespeare
from llmkit.generate import GenerationConfig
from llmkit.serve.engine import Engine, Request


def one(model, prompt: list[int], chunk: int | None) -> dict:
    engine = Engine(model, "bench", max_batch=4, max_queue=4, prefill_chunk=chunk)
    times: list[float] = []
    first: list[float] = []
    done, long_done = threading.Event(), threading.Event()

    def emit(event):
        if event[0] == "token":
            times.append(time.monotonic())
        else:
            done.set()

    def emit_long(event):
        if event[0] == "token" and not first:
            first.append(time.monotonic())
        elif event[0] != "token":
            long_done.set()

    try:
        engine.submit([Request([1, 2, 3], GenerationConfig(max_new_tokens=64, do_sample=False, stop_token_ids=[]), emit)])
        while len(times) < 8:
            time.sleep(0.001)
        submitted = time.monotonic()
        engine.submit([Request(prompt, GenerationConfig(max_new_tokens=2, do_sample=False, stop_token_ids=[]), emit_long)])
        assert long_done.wait(1200) and done.wait(1200)
    finally:
        engine.close()
    before = [b - a for a, b in zip(times[:8], times[1:8])]
    during = [b - a for a, b in zip(times, times[1:]) if b > submitted and a < first[0]]
    step = statistics.median(before)
    worst = max(during) if during else first[0] - submitted
    return {"chunk": chunk or "none", "step_s": step, "worst_gap_s": worst, "ratio": worst / step, "ttft_s": first[0] - submitted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--chunks", default="0,512,256,128", help="comma list; 0: the whole prompt at once")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = llmkit.load(args.model)
    text = "\n".join(d.text for d in shakespeare("hamlet"))
    prompt = model.tokenizer.encode(text)[: args.prompt_tokens]
    print(f"{args.model}, a {len(prompt)}-token prompt joins one running stream; {args.threads} threads")
    print(f"{'chunk':>6} {'step ms':>8} {'worst gap ms':>13} {'worst / step':>13} {'long TTFT s':>12}")
    for c in args.chunks.split(","):
        r = one(model, prompt, int(c) or None)
        print(
            f"{r['chunk']!s:>6} {r['step_s'] * 1e3:8.1f} {r['worst_gap_s'] * 1e3:13.0f} {r['ratio']:13.1f} {r['ttft_s']:12.1f}", flush=True
        )


if __name__ == "__main__":
    main()
