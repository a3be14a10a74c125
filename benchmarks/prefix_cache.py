"""Time to first token when a request shares a long start with an earlier one: `llmkit serve`'s prefix cache against
llama.cpp's server (llama-cpp-python[server], which reuses the longest start it shares with the previous request's
tokens: llama.cpp's `cache_prompt`), on the same GGUF (SmolLM2-135M-Instruct Q4_1), both on 127.0.0.1 with 2 threads.

    python benchmarks/prefix_cache.py                      # a shared start of ~2,000 tokens (Hamlet), 3 rounds
    python benchmarks/prefix_cache.py --prefix-tokens 1000 --skip-peer

Each round sends, one after the other, streaming /v1/completions requests of the shared start + a question of their
own: the first of a round (a start no request has sent yet: each round's start begins with its own line) pays the whole
prefill, the second reuses it; the time to the first streamed token of each is reported (median over the rounds), with
`usage.prompt_tokens_details.cached_tokens` from llmkit. It stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from serve_load import free_port, start, stop  # noqa: E402


async def first_token(url: str, body: dict) -> tuple[float, int | None]:
    """(seconds to the first streamed text, cached_tokens the server reports or None)."""
    import aiohttp

    sent = time.perf_counter()
    ttft, cached = None, None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            if r.status != 200:
                raise SystemExit(f"HTTP {r.status}: {(await r.text())[:300]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if ttft is None and any(c.get("text") for c in data.get("choices", [])):
                    ttft = time.perf_counter() - sent
                details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens", cached)
    return (ttft if ttft is not None else time.perf_counter() - sent), cached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-peer", action="store_true")
    args = p.parse_args()
    from llmkit.data.sources import shakespeare
    from llmkit.embedded import embedded_path
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load("smollm2")
    text = shakespeare("hamlet")[0].text
    ids = tok.encode(text, add_special_tokens=False)[: args.prefix_tokens]
    shared = tok.decode(ids)
    logs = ROOT / "benchmarks" / ".logs"
    logs.mkdir(exist_ok=True)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers = {}
    port = free_port()
    servers["llmkit"] = (
        [sys.executable, "-m", "llmkit", "serve", "--model", "smollm2", "--embedding-model", "none", "--port", str(port)]
        + ["--log-level", "warning"],
        port,
    )
    if not args.skip_peer:
        port = free_port()
        servers["llama.cpp"] = (
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_path("smollm2")), "--n_threads", str(args.threads)]
            + ["--n_threads_batch", str(args.threads), "--n_ctx", "4096", "--port", str(port), "--verbose", "False"],
            port,
        )
    results = {}
    for name, (cmd, port) in servers.items():
        print(f"starting {name} ...", flush=True)
        proc = start(cmd, port, logs / f"prefix-{name}.log", env)
        try:
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(first_token(url, {"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "temperature": 0}))  # warm-up
            cold, warm, cached = [], [], []
            for r in range(args.rounds):
                start_text = f"Round {r} of a reading.\n{shared}\n"
                for i, question in enumerate(("Who speaks first?", "Where are they?")):
                    body = {"model": "smollm2", "prompt": start_text + question, "max_tokens": 4, "temperature": 0}
                    seconds, c = asyncio.run(first_token(url, body))
                    (cold if i == 0 else warm).append(seconds)
                    if i == 1:
                        cached.append(c)
                print(f"  {name} round {r}: first {cold[-1]:.2f} s, second {warm[-1]:.2f} s (cached tokens {cached[-1]})", flush=True)
            results[name] = (statistics.median(cold), statistics.median(warm), cached[-1])
        finally:
            stop(proc)
    print(f"\nshared start: {len(ids)} tokens of Hamlet; time to first token, median of {args.rounds} rounds")
    print("| server | first request (s) | second request, shared start (s) | speed-up | cached tokens |")
    print("|---|---|---|---|---|")
    for name, (c, w, k) in results.items():
        print(f"| {name} | {c:.2f} | {w:.2f} | {c / w:.1f}x | {k if k is not None else '-'} |")
    if "llama.cpp" in results:
        print(f"\nsecond request, llmkit / llama.cpp: {results['llmkit'][1] / results['llama.cpp'][1]:.2f}x the time")


if __name__ == "__main__":
    main()
