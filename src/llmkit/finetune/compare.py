"""`llmkit finetune compare`: several methods on the same task, side by side — what each gains on the task, what it
costs in forgetting, in trainable parameters and in memory — plus in-context (few-shot) accuracy of the untouched model
and, optionally, accuracy against the number of training examples.

Preference methods join the table: `dpo` and `orpo` train on pairs the starting model's own sampled answers make,
judged by the task's verifier (`llmkit finetune pairs`), and are scored on the task's held-out questions; `grpo` trains
on the verifier's rewards. Each starts from --model, or with `METHOD+dpo` (e.g. `lora+dpo`) from the model the METHOD
row trained (SFT first, then preference training, as the field does it): its "before" is then that model's.

Each fine-tuning run is its own process (`llmkit finetune --json`), so its peak memory is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model.weights import load as load_model

SFT_METHODS = ("full", "lora", "adapter")
PREFERENCE_METHODS = ("dpo", "orpo", "grpo")


def check_methods(methods: list[str]) -> None:
    """SFT methods (full, lora, adapter, multitask-METHOD), preference ones (dpo, orpo, grpo) and chains SFT+PREFERENCE
    whose SFT row is listed before them."""
    for i, m in enumerate(methods):
        first, _, then = m.partition("+")
        if then:
            if then not in PREFERENCE_METHODS or first.removeprefix("multitask-") not in SFT_METHODS:
                raise LlmkitError(
                    f"unknown method {m!r}", "a chain is an SFT method listed before it, then dpo, orpo or grpo: e.g. lora,lora+dpo"
                )
            if first not in methods[:i]:
                raise LlmkitError(f"{m!r} starts from the {first} row, which is not listed before it", f"list it first: {first},{m}")
        elif m.removeprefix("multitask-") not in SFT_METHODS and m not in PREFERENCE_METHODS:
            raise LlmkitError(f"unknown method {m!r}", "use full, lora, adapter, multitask-lora (etc.), dpo, orpo, grpo or lora+dpo (etc.)")


def run_method(base_args: list[str], method: str, out: Path, extra: list[str] | None = None) -> dict:
    multitask = method.startswith("multitask-")
    args = [
        sys.executable,
        "-m",
        "llmkit",
        "finetune",
        *base_args,
        "--method",
        method.removeprefix("multitask-"),
        "--out",
        str(out),
        "--json",
        *(extra or []),
    ]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlmkitError(
            f"the {method} run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
            f"run it alone to see why: {' '.join(args[2:])}",
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["method"] = method if not multitask else method
    return result


def preference_flags(method: str, start: str, task: str, out: Path, seed: int, log) -> list[str]:
    """The flags of a preference run in a comparison: GRPO trains on the task's verifier as it is; DPO and ORPO on pairs
    of the starting model's own answers judged by it, written first (out.pairs.jsonl), and scored on the task."""
    if method == "grpo":
        return []
    from llmkit.finetune.preference import MIN_PAIRS, build_pairs

    pairs, counts = build_pairs(start, task, seed=seed, log=log)
    if len(pairs) < MIN_PAIRS:
        raise LlmkitError(
            f"{start} answered {counts['right']} of {counts['answers']} sampled answers right: {len(pairs)} pairs are too few for {method}",
            f"start it from a fine-tuned model (e.g. --methods lora,lora+{method}), where right and wrong answers both come",
        )
    path = out.with_suffix(".pairs.jsonl")
    io.write_jsonl(path, pairs)
    return ["--data", str(path), "--eval-task", task]


def few_shot(model_name: str, task: str, shots: int, n_val: int, seed: int, max_new_tokens: int) -> float:
    """Exact-match accuracy of the untouched model with `shots` solved training examples before each question."""
    from llmkit.chat import chat_prompt_ids
    from llmkit.data import tasks as T
    from llmkit.finetune.recipe import exact_match
    from llmkit.generate import GenerationConfig, generate

    model = load_model(model_name)
    tok = model.tokenizer
    val = T.mixture(task, n_val, "val", seed)
    demos = T.mixture(task, max(shots, 1), "train", seed + 99)[:shots]
    prompts = []
    for ex in val:
        history = [m for d in demos for m in d.messages]
        prompts.append(chat_prompt_ids(tok, history + ex.messages[:-1]))
    preds = []
    for i in range(0, len(prompts), 8):
        preds += [
            g.text
            for g in generate(
                model, tok, prompts[i : i + 8], GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False), warn=lambda m: None
            )
        ]
    return exact_match(preds, val)


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        b, a = r["before"], r["after"]
        metric = next(m for m in ("exact_match", "score", "accuracy", "pearson") if m in a)
        forget = {k: a[k] - b[k] for k in a if k.startswith("untrained_")}
        rows.append(
            {
                "method": r["method"],
                "n_train": r.get("n_train"),
                "trainable_share": r["trainable_share"],
                "metric": metric,
                "before": b[metric],
                "after": a[metric],
                "gain": a[metric] - b[metric],
                "general_bpb_change": (a["general_bpb"] - b["general_bpb"]) if "general_bpb" in a else None,
                "untrained_change": sum(forget.values()) / len(forget) if forget else None,
                "embedding_drift": a.get("embedding_drift_cosine"),
                "seconds": r["seconds"],
                "peak_memory_mb": r["peak_memory_mb"],
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        x = r["general_bpb_change"] if r["general_bpb_change"] is not None else 1 - (r["embedding_drift"] or 1)
        ax.scatter([x], [r["gain"]], s=80)
        ax.annotate(
            f"{r['method']}" + (f" ({r['n_train']})" if r.get("n_train") else ""), (x, r["gain"]), textcoords="offset points", xytext=(6, 6)
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("forgetting: change of bits per byte on general text (or 1 - embedding cosine)")
    ax.set_ylabel("task gain (metric after - before)")
    ax.set_title("fine-tuning: task gain against forgetting")
    ax.grid(alpha=0.3)
    io.save_figure(fig, path)
    plt.close(fig)


def compare(
    base_args: list[str],
    methods: list[str],
    out: Path,
    *,
    task: str,
    model: str,
    shots: list[int],
    curve: list[int],
    n_val: int,
    seed: int,
    max_new_tokens: int,
    log=print,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)

    def flags(method: str) -> list[str]:
        """A multitask method trains on a mixture of the task with the other built-in ones, and is evaluated on the task."""
        if not method.startswith("multitask-"):
            return []
        return [
            "--task",
            f"{task}:2,reverse:1,sort:1,dates:1" if task != "reverse" else f"{task}:2,arithmetic:1,sort:1,dates:1",
            "--eval-task",
            task,
        ]

    results, failed = [], {}
    for m in methods:
        first, _, then = m.partition("+")
        if then or m in PREFERENCE_METHODS:
            start = str(out / first) if then else model
            log(f"fine-tuning with {then or m}, from {start} ...")
            try:  # a preference row that cannot run (too few pairs, no verifier) is said and left out; the others go on
                extra = ["--model", start, *preference_flags(then or m, start, task, out / m, seed, log)]
                result = run_method(base_args, then or m, out / m, extra)
            except LlmkitError as e:
                log(f"{m}: {e.message} — {e.fix}")
                failed[m] = e.message
                continue
            result["method"] = m
        else:
            log(f"fine-tuning with {m} ...")
            result = run_method(base_args, m, out / m, flags(m))
        results.append(result)
    for n in curve:
        log(f"fine-tuning with {methods[0]} on {n} examples ...")
        r = run_method(base_args, methods[0], out / f"{methods[0]}-{n}", flags(methods[0]) + ["--n-train", str(n)])
        r["n_train"] = n
        results.append(r)
    rows = table_rows(results)
    in_context = {}
    for k in shots:
        log(f"{k}-shot prompting of the untouched model ...")
        in_context[k] = few_shot(model, task, k, n_val, seed, max_new_tokens)
    summary = {"task": task, "model": model, "rows": rows, "few_shot": in_context, **({"failed": failed} if failed else {})}
    io.write_json(out / "compare.json", summary)
    plot(rows, out / "compare.png")
    return summary
