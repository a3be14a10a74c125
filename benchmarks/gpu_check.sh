#!/usr/bin/env bash
# Every GPU path of llmkit on one CUDA card, in under 8 minutes, as one table (issue 28):
#   generate eager and compiled (CUDA graphs) with decode tokens/s; LoRA and QLoRA (bitsandbytes NF4) fine-tunes of
#   SmolLM2 for 50 steps with their loss and peak memory; serve with 16 concurrent requests; eval tasks on the built-in
#   suite; a 2-minute pretraining run with its MFU.
# Needs: llmkit installed with a CUDA build of torch (and bitsandbytes for QLoRA) on a machine with one GPU.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # the table on stdout and in OUT_DIR/gpu_check.md (default: runs/gpu_check)
set -uo pipefail
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
exec "$PY" - "$OUT" <<'PYEOF'
import json, os, subprocess, sys, threading, time, urllib.request

out = sys.argv[1]
import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a GPU machine")
card = torch.cuda.get_device_name(0)
rows = []


def run(name, args, timeout=150, env=None):
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    seconds = time.time() - started
    if proc.returncode != 0:
        rows.append((name, "FAILED", proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else f"exit {proc.returncode}", f"{seconds:.0f}"))
        return None
    return proc.stdout, seconds


for label, env in (("generate, eager", {"LLMKIT_COMPILE": "0"}), ("generate, compiled (CUDA graphs)", {"LLMKIT_COMPILE": "always"})):
    got = run(label, ["generate", "--model", "smollm2", "--device", "cuda", "--greedy", "--max-new-tokens", "256",
                      "--prompt", "Once upon a time", "--json"], env=env)
    if got:
        line = json.loads(got[0].strip().splitlines()[-1])
        rows.append((label, f"{line.get('decode_tokens_per_s', 0):.1f} tokens/s", repr(line.get("text", ""))[:40], f"{got[1]:.0f}"))

cpu = run("greedy tokens, cpu", ["generate", "--model", "smollm2", "--device", "cpu", "--dtype", "fp32", "--quantize", "none", "--greedy",
                                   "--max-new-tokens", "32", "--chat", "--prompt", "What is the capital of France?", "--json"], env={"LLMKIT_COMPILE": "0"})
gpu = run("greedy tokens, cuda", ["generate", "--model", "smollm2", "--device", "cuda", "--dtype", "fp32", "--quantize", "none", "--greedy",
                                   "--max-new-tokens", "32", "--chat", "--prompt", "What is the capital of France?", "--json"], env={"LLMKIT_COMPILE": "0"})
if cpu and gpu:
    a, b = (json.loads(x[0].strip().splitlines()[-1])["ids"] for x in (cpu, gpu))
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    rows.append(("cpu and cuda agree (fp32, greedy)", "yes" if same is None else f"differ at token {same}", f"{len(a)} tokens", ""))

for method in ("lora", "qlora"):
    got = run(f"finetune {method}, 50 steps", ["finetune", "--model", "smollm2", "--method", method, "--device", "cuda",
                                                "--budget", "50steps", "--n-val", "16", "--forgetting-tasks", "",
                                                "--out", f"{out}/{method}", "--json"], timeout=240)
    if got:
        r = json.loads(got[0].strip().splitlines()[-1])
        rows.append((f"finetune {method}, 50 steps", f"loss {r['final_loss']:.3f}, exact {r['after']['exact_match']:.2f}",
                     f"peak {r.get('peak_gpu_memory_mb', r['peak_memory_mb']):.0f} MB", f"{got[1]:.0f}"))

port = 18731
server = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", "smollm2", "--device", "cuda", "--port", str(port),
                           "--api-key", "sk-gpu-check-0000", "--db", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    started = time.time()
    while time.time() - started < 120:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                break
        except Exception:
            time.sleep(1)
    done, errors = [], []

    def one(i):
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 64}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json", "Authorization": "Bearer sk-gpu-check-0000"})
        try:
            done.append(json.loads(urllib.request.urlopen(req, timeout=120).read())["usage"]["completion_tokens"])
        except Exception as e:
            errors.append(str(e))

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.time() - t0
    rows.append(("serve, 16 concurrent", f"{sum(done) / wall:.0f} tokens/s", f"{len(done)} ok, {len(errors)} failed", f"{wall:.0f}"))
finally:
    server.terminate()
    server.wait(30)

got = run("eval tasks (built-in)", ["eval", "tasks", "--model", "smollm2", "--device", "cuda", "--tasks", "arithmetic,reverse,sort,dates",
                                    "--limit", "50", "--out", f"{out}/eval", "--json"], timeout=180)
if got:
    res = json.loads(got[0].strip().splitlines()[-1])
    rows.append(("eval tasks (built-in)", ", ".join(f"{t} {next(v for k, v in m.items() if isinstance(v, float)):.2f}" for t, m in res.items()), "", f"{got[1]:.0f}"))

got = run("pretrain 2 minutes", ["pretrain", "--preset", "gpt2", "--budget", "2m", "--out", f"{out}/pretrain"], timeout=240)
if got:
    logged = [json.loads(line) for line in open(f"{out}/pretrain/metrics.jsonl") if line.strip()]
    mfu = [r["mfu"] for r in logged if "mfu" in r][-20:]
    bpb = [r.get("bpb", r.get("val_bpb")) for r in logged if r.get("split") == "val"]
    rows.append(("pretrain 2 minutes", f"MFU {sum(mfu) / max(len(mfu), 1):.1%}", f"val bpb {bpb[-1] if bpb else float('nan'):.3f}", f"{got[1]:.0f}"))

table = [f"GPU check on {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", "",
         "| what | result | detail | seconds |", "|---|---|---|---|"] + [f"| {' | '.join(map(str, r))} |" for r in rows]
print("\n".join(table))
open(f"{out}/gpu_check.md", "w").write("\n".join(table) + "\n")
PYEOF
