"""A preference set the toolkit builds itself, and what DPO does with it on a CPU (issue 30).

    python benchmarks/preference_smollm2.py --out runs/pref        # sample, judge, pair, then DPO with LoRA

0. SmolLM2-Instruct answers arithmetic in sentences ("To solve this, ..."): the task's verifier (the exact number)
   rejects every answer, so no pair has a right side. A short SFT first (`finetune --method lora`, --sft-steps) makes
   the model answer with a number, right about a third of the time.
1-2. `llmkit.finetune.preference.build_pairs` (the library's `llmkit finetune pairs`): the SFT model samples --samples
   answers (temperature 0.8) to each of --prompts questions of the built-in arithmetic task (its training split),
   through the chat template; the task's verifier judges each answer (the exact number); a prompt with a right and a
   wrong answer gives a pair (chosen: right, rejected: wrong). No human, no other model.
3. `llmkit finetune --model SFT --method dpo --data pairs.jsonl` (LoRA on the SFT model, the reference is the SFT
   model: the adapters off) for
   --steps steps; its held-out pairs' reward accuracy and the arithmetic exact match (greedy, 24 validation questions
   the pairs never saw) before and after come from the run's results.json.

Prints the counts, the minutes each stage took and the before/after table; writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=160)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--out", default="runs/pref")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import llmkit
    from llmkit.finetune.preference import build_pairs

    started = time.time()
    sft = out / "sft"
    cmd = [sys.executable, "-m", "llmkit", "finetune", "--model", "smollm2", "--method", "lora", "--task", "arithmetic"]
    cmd += ["--budget", f"{args.sft_steps}steps", "--n-val", "24", "--forgetting-tasks", "", "--general-tokens", "256", "--out", str(sft)]
    cmd += ["--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    sft_result = json.loads(proc.stdout.strip().splitlines()[-1])
    sft_minutes = (time.time() - started) / 60
    print(
        f"SFT, {args.sft_steps} steps in {sft_minutes:.1f} min: exact match "
        f"{sft_result['before']['exact_match']:.3f} -> {sft_result['after']['exact_match']:.3f}"
    )
    started = time.time()
    model = llmkit.load(sft)
    pairs, counts = build_pairs(model, "arithmetic", prompts=args.prompts, samples=args.samples, log=print)
    right = counts["right"]
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs)
    sampled = time.time() - started
    print(f"sampled and judged in {sampled / 60:.1f} min")

    started = time.time()
    run = out / "dpo"
    cmd = [sys.executable, "-m", "llmkit", "finetune", "--model", str(sft), "--method", "dpo", "--data", str(out / "pairs.jsonl")]
    cmd += ["--budget", f"{args.steps}steps", "--lr", "2e-4", "--beta", "0.1", "--forgetting-tasks", "arithmetic", "--n-forgetting", "24"]
    cmd += ["--general-tokens", "1024", "--out", str(run), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    trained = time.time() - started
    rows = [(k, result["before"][k], result["after"][k]) for k in result["after"] if not k.startswith("_")]
    print(f"DPO, {args.steps} steps in {trained / 60:.1f} min (train phase {result['phases']['train'] / 60:.1f} min):")
    for k, before, after in rows:
        print(f"  {k:<22} {before:8.4f} -> {after:8.4f}")
    summary = {
        "sft_minutes": sft_minutes,
        "sft_exact_match": [sft_result["before"]["exact_match"], sft_result["after"]["exact_match"]],
        "prompts": counts["questions"],
        "samples": args.samples,
        "right_answers": right,
        "pairs": len(pairs),
        "sample_minutes": sampled / 60,
        "dpo_minutes": trained / 60,
        "train_minutes": result["phases"]["train"] / 60,
        "before": result["before"],
        "after": result["after"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
