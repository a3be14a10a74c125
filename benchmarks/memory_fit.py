"""`llmkit model memory` against the peaks it predicts: each command runs in a process of its own, its peak resident
memory read from the kernel (wait4's ru_maxrss), beside the prediction `llmkit model memory ... --json` makes for the
same settings on the same machine. The target (issue 28): within 25% for inference, LoRA and QLoRA on SmolLM2 and
MiniLM.

    python benchmarks/memory_fit.py            # prints a table (predicted, measured, ratio) and writes memory_fit.json

The fine-tunes pack their rows (--pack), so every row is as long as --max-len, the length the prediction assumes; the
encoder's rows are cut at its context (genre passages are longer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

LLMKIT = [sys.executable, "-m", "llmkit"]
FT = ["--budget", "6steps", "--n-train", "64", "--n-val", "8", "--forgetting-tasks", "", "--general-tokens", "256"]
GENRE = ["--task", "genre", "--batch-size", "8", "--budget", "6steps", "--n-train", "64", "--n-val", "16"]  # the classifier runs
CASES = [
    # (name, the command, the prediction's options)
    (
        "SmolLM2 inference (generate)",
        ["generate", "--model", "smollm2", "--prompt", "Hello there", "--max-new-tokens", "32", "--greedy", "--no-compile"],
        ["smollm2", "--method", "inference", "--batch-size", "1", "--max-len", "40"],
    ),
    (
        "SmolLM2 LoRA, batch 8 x 128",
        ["finetune", "--model", "smollm2", "--method", "lora", "--pack", "--max-len", "128", "--batch-size", "8", *FT],
        ["smollm2", "--method", "lora", "--batch-size", "8", "--max-len", "128"],
    ),
    (
        "SmolLM2 QLoRA, batch 8 x 128",
        ["finetune", "--model", "smollm2", "--method", "qlora", "--pack", "--max-len", "128", "--batch-size", "8", *FT],
        ["smollm2", "--method", "qlora", "--batch-size", "8", "--max-len", "128"],
    ),
    (
        "SmolLM2 LoRA + checkpointing, batch 8 x 128",
        ["finetune", "--model", "smollm2", "--method", "lora", "--checkpointing", "--pack", "--max-len", "128", "--batch-size", "8", *FT],
        ["smollm2", "--method", "lora", "--checkpointing", "--batch-size", "8", "--max-len", "128"],
    ),
    (
        "MiniLM inference (embed text)",
        ["embed", "text", "--model", "minilm", "A man is eating food.", "Someone eats a meal.", "--json"],
        ["minilm", "--method", "inference", "--batch-size", "2", "--max-len", "16"],
    ),
    (
        "MiniLM LoRA (genre), batch 8 x 256",
        ["finetune", "--model", "minilm", "--method", "lora", *GENRE],
        ["minilm", "--method", "lora", "--batch-size", "8", "--max-len", "256"],
    ),
    (
        "MiniLM QLoRA (genre), batch 8 x 256",
        ["finetune", "--model", "minilm", "--method", "qlora", *GENRE],
        ["minilm", "--method", "qlora", "--batch-size", "8", "--max-len", "256"],
    ),
]


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of one command in a process of its own."""
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile() as err:
        full = cmd + (["--out", f"{out}/run"] if cmd[0] == "finetune" else [])
        started = time.time()
        proc = subprocess.Popen(LLMKIT + full, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "LLMKIT_COMPILE": "0"})
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(full)} failed:\n{err.read().decode()[-2000:]}")
        return usage.ru_maxrss * 1024, time.time() - started


def main() -> None:
    rows = []
    for name, cmd, predict_args in CASES:
        predicted = json.loads(
            subprocess.run(LLMKIT + ["model", "memory", *predict_args, "--json"], capture_output=True, text=True, check=True).stdout
        )
        measured, seconds = peak_of(cmd)
        ratio = predicted["total_bytes"] / measured
        rows.append(
            {
                "case": name,
                "predicted_mb": predicted["total_bytes"] / 2**20,
                "measured_mb": measured / 2**20,
                "ratio": ratio,
                "parts_mb": {k: round(v / 2**20) for k, v in predicted["parts"].items()},
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"{name:<44} predicted {rows[-1]['predicted_mb']:7.0f} MB  measured {rows[-1]['measured_mb']:7.0f} MB  ratio {ratio:.2f}",
            flush=True,
        )
    within = sum(abs(r["ratio"] - 1) <= 0.25 for r in rows)
    print(f"{within} of {len(rows)} within 25%")
    with open("memory_fit.json", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
