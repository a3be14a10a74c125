"""What a new user meets: the README's first commands timed as a user runs them, with an empty compile cache (a fresh
machine) and again with the cache it left (every later run), and llama.cpp's load + generate as the peer.

    python benchmarks/first_run.py                       # cold, then warm; llama.cpp if llama-cpp-python is installed
    python benchmarks/first_run.py --skip finetune,serve # the decoding commands only

Each command runs as its own process (`python -m llmkit ...`), with TORCHINDUCTOR_CACHE_DIR set to a folder of this
run: empty for the cold pass, as the cold pass left it for the warm one. Timed:

    generate   llmkit generate --model smollm2 --chat --greedy --max-new-tokens 32 --json (wall time; its decode tokens/s)
    chat       llmkit chat, two turns typed on standard input, then /exit
    finetune   llmkit finetune --model smollm2 --method lora --task arithmetic --budget 20steps (wall time and each phase)
    serve      llmkit serve until /health answers 200 (then stopped with SIGTERM)
    decode     the compiled step (LLMKIT_COMPILE=always), 256 greedy tokens, decode tokens/s: the GGUF's own blocks (the
               default's weights) and int4 (opt-in), against llama.cpp's decode in the same run

llama.cpp (llama-cpp-python, see benchmarks/RESULTS.md for its build) loads the same GGUF and answers the same chat
message in 32 tokens, in a process of its own: the peer of `generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "Write a short poem about the sea."
CHAT_INPUT = "What is the capital of France?\nAnd of Italy?\n/exit\n"
PEER = """
import sys, time, json
t = time.perf_counter()
from llama_cpp import Llama
from llmkit.embedded import embedded_path
llm = Llama(model_path=str(embedded_path("smollm2")), n_ctx=2048, n_threads=int(sys.argv[1]), verbose=False)
loaded = time.perf_counter()
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=32, temperature=0.0)
print(json.dumps({"load_s": loaded - t, "total_s": time.perf_counter() - t, "tokens": out["usage"]["completion_tokens"]}))
"""
PEER_DECODE = """
import sys, json
sys.path.insert(0, sys.argv[3])
from decode_speed import bench_llama_cpp, prompt_ids
import llmkit
from llmkit.embedded import embedded_path
tok = llmkit.load("smollm2").tokenizer
pre, dec = bench_llama_cpp(str(embedded_path("smollm2")), prompt_ids(tok, 512), int(sys.argv[2]), int(sys.argv[1]), False)
print(json.dumps({"decode_tokens_per_s": dec}))
"""


def run(args: list[str], env: dict, stdin: str | None = None, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc


def llmkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmkit", *args]


def serve_until_healthy(env: dict, work: Path) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    log = (work / f"serve-{port}.log").open("w")
    proc = subprocess.Popen(llmkit("serve", "--port", str(port), "--db", "none"), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while time.perf_counter() - start < 1800:
            if proc.poll() is not None:
                raise SystemExit(f"llmkit serve exited: see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except Exception:  # noqa: BLE001  (not up yet)
                pass
            time.sleep(0.25)
        raise SystemExit("llmkit serve was not healthy in 30 minutes")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def one_pass(name: str, env: dict, work: Path, skip: set[str], threads: int) -> dict:
    out: dict = {}
    if "generate" not in skip:
        seconds, proc = run(
            llmkit("generate", "--model", "smollm2", "--chat", "--greedy", "--max-new-tokens", "32", "--prompt", PROMPT, "--json"), env
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out["generate"] = {"wall_s": seconds, "tokens": len(row["ids"]), "decode_tokens_per_s": row.get("decode_tokens_per_s")}
        print(f"[{name}] generate: {seconds:.1f} s ({len(row['ids'])} tokens, {row.get('decode_tokens_per_s')} tokens/s)", flush=True)
    if "chat" not in skip:
        seconds, proc = run(llmkit("chat", "--model", "smollm2", "--greedy"), env, stdin=CHAT_INPUT)
        out["chat"] = {"wall_s": seconds, "paris": "Paris" in proc.stdout, "rome": "Rome" in proc.stdout}
        print(f"[{name}] chat (two turns): {seconds:.1f} s", flush=True)
    if "finetune" not in skip:
        run_dir = work / f"ft-{name}"
        args = ("finetune", "--model", "smollm2", "--method", "lora", "--task", "arithmetic", "--budget", "20steps", "--out", str(run_dir))
        seconds, proc = run(llmkit(*args), env)
        phases = json.loads((run_dir / "results.json").read_text())["phases"]
        out["finetune"] = {"wall_s": seconds, "phases": phases}
        print(f"[{name}] finetune 20 LoRA steps: {seconds:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), flush=True)
    if "serve" not in skip:
        seconds = serve_until_healthy(env, work)
        out["serve"] = {"healthy_s": seconds}
        print(f"[{name}] serve until healthy: {seconds:.1f} s", flush=True)
    if "decode" not in skip:
        bench = Path(__file__).parent / "decode_speed.py"
        for weights in ("gguf", "int4"):
            args = [sys.executable, str(bench), "--dtypes", weights, "--compile", "on", "--skip", "transformers,llama.cpp"]
            args += ["--repeats", "3", "--new-tokens", "256", "--threads", str(threads)]  # the median: the first pays the compile
            seconds, proc = run(args, env)
            line = next(x for x in proc.stdout.splitlines() if "decode" in x and weights in x)
            rate = float(line.split("decode")[1].split()[0].replace(",", ""))
            out[f"decode_{weights}"] = {"decode_tokens_per_s": rate, "wall_s": seconds}
            print(f"[{name}] compiled step, {weights}: decode {rate:.1f} tokens/s ({seconds:.0f} s with its load and compile)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", default="", help="comma list: generate,chat,finetune,serve,decode,llama.cpp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="llmkit-first-run-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "OMP_NUM_THREADS": str(args.threads)}
    env.pop("LLMKIT_COMPILE", None)
    results = {"cold": one_pass("cold", env, work, skip, args.threads), "warm": one_pass("warm", env, work, skip, args.threads)}
    if "llama.cpp" not in skip:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp peer skipped: pip install llama-cpp-python (see benchmarks/RESULTS.md)")
        else:
            seconds, proc = run([sys.executable, "-c", PEER, str(args.threads), PROMPT], env)
            peer = json.loads(proc.stdout.strip().splitlines()[-1])
            results["llama.cpp"] = {"generate_wall_s": seconds, **peer}
            print(f"[llama.cpp] load + generate: {seconds:.1f} s (load {peer['load_s']:.1f} s, {peer['tokens']} tokens)")
            seconds, proc = run([sys.executable, "-c", PEER_DECODE, str(args.threads), "256", str(Path(__file__).parent)], env)
            results["llama.cpp"]["decode_tokens_per_s"] = json.loads(proc.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]
            print(f"[llama.cpp] decode {results['llama.cpp']['decode_tokens_per_s']:.1f} tokens/s")
    cold, warm = results["cold"], results["warm"]
    if "generate" in cold:
        print(f"first generate / warm generate: {cold['generate']['wall_s'] / warm['generate']['wall_s']:.2f}x (target <= 2x)")
        if "llama.cpp" in results:
            print(f"warm generate / llama.cpp load + generate: {warm['generate']['wall_s'] / results['llama.cpp']['generate_wall_s']:.2f}x")
    for key in ("decode_gguf", "decode_int4"):
        if key in warm and "llama.cpp" in results:
            ratio = warm[key]["decode_tokens_per_s"] / results["llama.cpp"]["decode_tokens_per_s"]
            print(f"warm {key}: {ratio:.2f}x llama.cpp (cold run: {cold[key]['decode_tokens_per_s']:.1f} tokens/s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
