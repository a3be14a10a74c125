"""A preference set the toolkit builds itself, and what DPO does with it on a CPU (issue 30).

    python benchmarks/preference_smollm2.py --out runs/pref        # sample, judge, pair, then DPO with LoRA

0. SmolLM2-Instruct answers arithmetic in sentences ("To solve this, ..."): the task's verifier (the exact number)
   rejects every answer, so no pair has a right side. A short SFT first (`finetune --method lora`, --sft-steps) makes
   the model answer with a number, right about a third of the time.
1. The SFT model samples --samples answers (temperature 0.8) to each of --prompts questions of the built-in arithmetic
   task (its training split), through the chat template.
2. The task's verifier judges each answer (the exact number); a prompt with a right and a wrong answer gives a pair
   (chosen: right, rejected: wrong). No human, no other model.
3. `llmkit finetune --model SFT --method dpo --data pairs.jsonl` (LoRA on the SFT model, the reference is the SFT
   model: the adapters off) for
   --steps steps; its held-out pairs' reward accuracy and the arithmetic exact match (greedy, 24 validation questions
   the pairs never saw) before and after come from the run's results.json.

Prints the counts, the minutes each stage took and the before/after table; writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import random
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
    from llmkit.chat import chat_prompt_ids
    from llmkit.data import tasks as T
    from llmkit.generate import GenerationConfig, generate

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
    tok = model.tokenizer
    examples = T.task_examples("arithmetic", args.prompts, "train", 0)
    prompts = [chat_prompt_ids(tok, ex.messages[:-1]) for ex in examples]
    answers: list[list[str]] = [[] for _ in examples]
    for k in range(args.samples):
        for i in range(0, len(prompts), 16):
            cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.95, seed=1000 * k + i)
            for j, g in enumerate(generate(model, tok, prompts[i : i + 16], cfg, warn=lambda m: None)):
                answers[i + j].append(g.text.strip())
    sampled = time.time() - started
    rng = random.Random(0)
    pairs, right = [], 0
    for ex, got in zip(examples, answers):
        good = [a for a in got if T.normalize_answer(a) == T.normalize_answer(ex.answer)]
        bad = [a for a in got if T.normalize_answer(a) != T.normalize_answer(ex.answer)]
        right += len(good)
        if good and bad:
            pairs.append({"prompt": ex.messages[-2]["content"], "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs)
    print(f"{len(examples)} prompts x {args.samples} samples in {sampled / 60:.1f} min: {right} right answers, {len(pairs)} pairs")

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
        "prompts": len(examples),
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
