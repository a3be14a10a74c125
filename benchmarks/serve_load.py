"""A bounded load test of `llmkit serve` against llama.cpp's server (llama-cpp-python[server]) on the same GGUF
(SmolLM2-135M-Instruct Q4_1), both on 127.0.0.1 with 2 threads, in one run on this machine.

Each level sends a fixed number of streaming /v1/completions requests with a fixed prompt and a fixed output length
(greedy; the end-of-sequence tokens banned with logit_bias, which both servers implement, so every request generates
exactly --max-tokens tokens) from `concurrency` clients at once, and reports requests/s, output tokens/s, time to first
token and inter-token latency (p50 / p95 / p99), errors and lost requests. It stops by itself.

    python benchmarks/serve_load.py                                  # levels 1, 4, 16, 64
    python benchmarks/serve_load.py --levels 16 --max-tokens 64 --quantize int8
    python benchmarks/serve_load.py --skip-peer                      # llmkit only
    python benchmarks/serve_load.py --workloads plain,shared,mixed   # the three workloads below, in one run

Workloads (`--workloads`, default plain):
- plain: every prompt its own, 58 tokens.
- shared: a shared start of --shared-tokens tokens of Hamlet (a system prompt, a few-shot prefix, a document asked
  about) then a question of each request's own: what a prefix cache is for.
- mixed: one request in four has a long prompt of its own (--long-tokens tokens of Hamlet after its number), the rest
  are plain: the short requests' time to first token and every stream's worst gap between tokens show whether a long
  prefill stalls the others (chunked prefill).
Each server's time from its start to its first 200 on /v1/models is reported too, and llmkit's time until its compiled
decode steps are all in use (`llmkit_compiled_decode_steps` in /metrics; it serves eagerly until then): the load
starts after that. `--cold` gives llmkit an empty compile cache (a new user's first `llmkit serve`).

The peer and the load generator come with `pip install -e '.[bench]'` (llama-cpp-python[server], aiohttp).

In the plain workload every request has a prompt of its own of the same length ("Request 00017. " + a fixed text);
every request of a run has a number of its own (no server answers a later level from an earlier prompt): with one prompt for all,
llama-cpp-python would reuse the previous request's KV cache and skip the prefill. The peer runs with its default
parallel settings (one request at a time) and `--n_threads 2`, and `--interrupt_requests False`: by default a new
request interrupts the one being streamed, which loses requests under any concurrency. llmkit runs with its defaults
(--max-batch 16, --max-queue 64).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (
    "The following is a scene from a play. Two old friends meet on a road at night and talk about the harvest, the "
    "weather, their children and the news from the city. One of them has a secret he has kept for many years.\n\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except Exception:  # noqa: BLE001  (not up yet)
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[:4]} did not start in 300 s: see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def compiled_ready(port: int, limit: float = 3600) -> tuple[float, int]:
    """(seconds until llmkit's /metrics says no compiled decode step is still building, the steps then in use: fewer
    than the batch sizes means some failed and decode eagerly)."""
    import urllib.error
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                lines = [line for line in r.read().decode().splitlines() if line.startswith("llmkit_compiled_decode_steps{")]
        except (urllib.error.URLError, OSError):
            lines = []
        building = [float(line.split()[-1]) for line in lines if 'state="building"' in line]
        if building and not any(building):
            return time.perf_counter() - t0, int(sum(float(line.split()[-1]) for line in lines if 'state="in_use"' in line))
        time.sleep(1)
    raise SystemExit(f"the compiled steps were not built in {limit:.0f} s")


async def one(session, url: str, body: dict) -> dict:
    """One streaming request: arrival of each content chunk, the finish reason, or the error."""
    sent = time.perf_counter()
    stamps, finish = [], None
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return {"error": str(data["error"])[:200]}
                for choice in data.get("choices", []):
                    if choice.get("text"):
                        stamps.append(time.perf_counter())
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # noqa: BLE001  (counted as an error)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"sent": sent, "stamps": stamps, "finish": finish}


def prompts(workload: str, shared: str, long: str):
    """The workload's i-th prompt and its kind ("short" or "long")."""

    def prompt(i: int) -> tuple[str, str]:
        if workload == "shared":
            return f"{shared}\n\nRequest {i:05d}. Who speaks in this scene, and to whom?", "short"
        if workload == "mixed" and i % 4 == 0:  # the number first: no two long prompts share more than "Request "
            return f"Request {i:05d}. {long}", "long"
        # a prompt of its own (same length): no server answers from a cache of the previous request's prompt
        return f"Request {i:05d}. {PROMPT}", "short"

    return prompt


async def level(url: str, model: str, concurrency: int, count: int, max_tokens: int, eos: list[int], prompt=None, first: int = 0) -> dict:
    """`count` requests from `concurrency` clients; the prompts' numbers start at `first` (each level its own numbers:
    a server that keeps earlier prompts must not answer a later level from them)."""
    import aiohttp

    prompt = prompt or prompts("plain", "", "")
    queue = list(range(first, first + count))
    results = []

    async def worker(session):
        while queue:
            i = queue.pop()
            text, kind = prompt(i)
            body = {
                "model": model,
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "logit_bias": {str(t): -100 for t in eos},
            }
            results.append({**await one(session, url, body), "kind": kind})

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r and r["finish"] and r["stamps"]]
    short = [len(r["stamps"]) for r in ok if len(r["stamps"]) != max_tokens]
    if short:  # every token is one chunk (no stop strings): a shorter stream would make the tokens/s below a lie
        print(f"warning: {len(short)} streams did not send {max_tokens} token chunks (e.g. {short[0]})")
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["stamps"][0] - r["sent"] for r in ok]
    ttft_short = [r["stamps"][0] - r["sent"] for r in ok if r["kind"] == "short"]
    ttft_long = [r["stamps"][0] - r["sent"] for r in ok if r["kind"] == "long"]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    pieces = sum(len(r["stamps"]) for r in ok)
    return {
        "concurrency": concurrency,
        "requests": count,
        "completed": len(ok),
        "errors": len(errors),
        "lost": count - len(ok) - len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": len(ok) * max_tokens / wall,
        "chunks_per_request": pieces / max(len(ok), 1),
        **{f"ttft_{k}": v for k, v in percentiles(ttft).items()},
        **{f"itl_{k}": v for k, v in percentiles(itl).items()},
        "itl_max": max(itl, default=None),
        **({f"ttft_short_{k}": v for k, v in percentiles(ttft_short).items()} if ttft_long else {}),
        **({f"ttft_long_{k}": v for k, v in percentiles(ttft_long).items()} if ttft_long else {}),
    }


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", default=None, choices=["int8"], help="llmkit's weight-only int8 (default: float32 from the GGUF)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--workloads", default="plain", help="comma-separated: plain, shared, mixed")
    p.add_argument("--shared-tokens", type=int, default=1000)
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--cold", action="store_true", help="llmkit starts with an empty compile cache (TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from llmkit.data.sources import shakespeare
    from llmkit.embedded import embedded_path
    from llmkit.tokenizer import Tokenizer

    gguf = embedded_path("smollm2")
    levels = [int(x) for x in args.levels.split(",")]
    workloads = args.workloads.split(",")
    if bad := [w for w in workloads if w not in ("plain", "shared", "mixed")]:
        raise SystemExit(f"unknown workload {bad[0]!r}: plain, shared or mixed")
    tok = Tokenizer.load("smollm2")
    hamlet = tok.encode(shakespeare("hamlet")[0].text, add_special_tokens=False)
    shared_text = tok.decode(hamlet[: args.shared_tokens])
    long_text = tok.decode(hamlet[5000 : 5000 + args.long_tokens])  # not the shared start: the long prompts share nothing
    logs = ROOT / "benchmarks" / ".logs"
    logs.mkdir(exist_ok=True)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    servers = {}
    port = free_port()
    llmkit_cmd = [
        sys.executable,
        "-m",
        "llmkit",
        "serve",
        "--model",
        "smollm2",
        "--embedding-model",
        "none",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ] + (["--quantize", args.quantize] if args.quantize else [])
    servers["llmkit"] = (llmkit_cmd, port, "smollm2")
    if not args.skip_peer:
        port = free_port()
        servers["llama.cpp"] = (
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--n_threads",
                str(args.threads),
                "--n_threads_batch",
                str(args.threads),
                "--port",
                str(port),
                "--verbose",
                "False",
                "--interrupt_requests",
                "False",
                "--n_ctx",
                "4096",
            ],
            port,
            "smollm2",
        )
    eos = [0, 2]  # <|endoftext|>, <|im_end|>: banned, so every request runs to max_tokens
    table, ready = {}, {}
    for name, (cmd, port, model) in servers.items():
        print(f"starting {name} ...", flush=True)
        t0 = time.perf_counter()
        cold = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="llmkit-cold-")} if args.cold and name == "llmkit" else {}
        proc = start(cmd, port, logs / f"{name}.log", {**env, **cold})
        ready[name] = time.perf_counter() - t0
        print(f"{name} answered /v1/models {ready[name]:.1f} s after its start", flush=True)
        try:
            if name == "llmkit":
                seconds, in_use = compiled_ready(port)
                ready["llmkit compiled"] = ready[name] + seconds
                print(f"llmkit's compiled decode steps built {ready['llmkit compiled']:.1f} s after its start: {in_use} in use", flush=True)
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(level(url, model, 1, 2, 8, eos, first=99_998))  # warm-up
            first = 0  # each request of the run a number of its own
            for w in workloads:
                for c in levels:
                    count = args.requests or max(8, 2 * c)
                    first += count
                    r = asyncio.run(level(url, model, c, count, args.max_tokens, eos, prompts(w, shared_text, long_text), first - count))
                    table[(name, w, c)] = r
                    print(
                        f"{name:10s} {w:6s} c={c:3d} n={count:4d}  {r['output_tokens_per_s']:7.1f} tok/s  "
                        f"{r['requests_per_s']:6.2f} req/s  "
                        f"TTFT p50/p95/p99 {fmt(r, 'ttft')}"
                        + (f" (short {fmt(r, 'ttft_short')}, long {fmt(r, 'ttft_long')})" if "ttft_long_p50" in r else "")
                        + f"  ITL p50/p95/p99 {fmt(r, 'itl')} max {r['itl_max'] or 0:.3f}  errors {r['errors']} lost {r['lost']}"
                        + (f"  ({r['first_error']})" if r["first_error"] else ""),
                        flush=True,
                    )
        finally:
            stop(proc)
    if args.json:  # first: a summary that cannot be printed loses nothing
        Path(args.json).write_text(
            json.dumps({"ready_s": ready, "levels": [{"server": k[0], "workload": k[1], **v} for k, v in table.items()]}, indent=2)
        )
    if not args.skip_peer:
        print(
            f"\nready (first 200 on /v1/models): llmkit {ready['llmkit']:.1f} s (compiled steps in use {ready['llmkit compiled']:.1f} s"
            f"{', cold cache' if args.cold else ''}), llama.cpp {ready['llama.cpp']:.1f} s"
        )
        print(
            "\n| workload | concurrency | llmkit tokens/s | llama.cpp tokens/s | ratio | llmkit TTFT p50 / p95 "
            "| llama.cpp TTFT p50 / p95 | llmkit ITL p50 / p95 / max | llama.cpp ITL p50 / p95 / max | lost (both) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for w in workloads:
            for c in levels:
                a, b = table[("llmkit", w, c)], table[("llama.cpp", w, c)]
                short = "_short" if "ttft_short_p50" in a else ""
                print(
                    f"| {w} | {c} | {a['output_tokens_per_s']:.1f} | {b['output_tokens_per_s']:.1f} | "
                    f"{a['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x | "
                    f"{a[f'ttft{short}_p50']:.2f} / {a[f'ttft{short}_p95']:.2f} s | "
                    f"{b[f'ttft{short}_p50']:.2f} / {b[f'ttft{short}_p95']:.2f} s | "
                    f"{a['itl_p50'] * 1e3:.0f} / {a['itl_p95'] * 1e3:.0f} / {a['itl_max'] * 1e3:.0f} ms | "
                    f"{b['itl_p50'] * 1e3:.0f} / {b['itl_p95'] * 1e3:.0f} / {b['itl_max'] * 1e3:.0f} ms | {a['lost'] + b['lost']} |"
                )
        if "mixed" in workloads:
            print("(mixed: the TTFT columns are the short requests'; the long ones':)")
            for c in levels:
                a, b = table[("llmkit", "mixed", c)], table[("llama.cpp", "mixed", c)]
                print(f"  c={c}: long TTFT p50 / p95 llmkit {fmt(a, 'ttft_long')} s, llama.cpp {fmt(b, 'ttft_long')} s")


def fmt(r: dict, key: str) -> str:
    vals = [r[f"{key}_{q}"] for q in ("p50", "p95", "p99")]
    return "/".join("-" if v is None else f"{v:.3f}" for v in vals)


if __name__ == "__main__":
    main()
