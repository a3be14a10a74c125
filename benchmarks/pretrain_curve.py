"""Validation bits per byte against the training budget: llmkit's default recipe (cpu-modern, Muon + AdamW,
warmup-stable-decay) against the GPT-2 recipe it replaced (cpu-gpt, AdamW, cosine), each budget a separate run of
`llmkit pretrain` on Shakespeare shards prepared once per recipe's vocabulary, in one session on this machine.

    python benchmarks/pretrain_curve.py                          # budgets 1, 2, 5, 10 minutes (about 36 minutes)
    python benchmarks/pretrain_curve.py --budgets 1,2,5,10,30 --out runs/curve

Prints a table with the ratio and writes curve.png (bits per byte against minutes, both recipes) and curve.json.
Runs already in --out (a finished report) are read, not run again; every run's final model is scored again by this
llmkit's validation (bytes counted exactly).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from llmkit import io
from llmkit.train.pretrain import PretrainConfig

# name -> (flags, tokenizer kind and vocabulary: None for the default's); the GPT-2 recipe as `llmkit pretrain` ran it
# before (a byte-level BPE of 2,048 tokens, nanoGPT's random windows, no epoch limit)
RECIPES: dict[str, tuple[list[str], str | None, int | None]] = {
    "gpt2 (cpu-gpt, AdamW, cosine, byte-bpe 2048)": (
        ["--preset", "cpu-gpt", "--optimizer", "adamw", "--schedule", "cosine", "--sampling", "random", "--max-epochs", "0"],
        "byte-bpe",
        2048,
    ),
    "speedrun (cpu-modern, Muon, WSD; the default)": ([], None, None),
}


def run(out: Path, minutes: float, flags: list[str], data: str) -> dict:
    final = out / "metrics.jsonl"
    if not (out / "report.md").exists():
        cmd = [sys.executable, "-m", "llmkit", "pretrain", "--budget", f"{minutes * 60:.0f}s", "--out", str(out), "--no-samples"]
        subprocess.run(cmd + ["--data", data] + flags, check=True)
    rows = io.read_jsonl(final)
    train = [r for r in rows if r.get("split") == "train"]
    val = rescore(out, Path(data))
    return {"minutes": minutes, "val_bpb": val["bpb"], "val_loss": val["loss"], "steps": train[-1]["step"] if train else 0}


def rescore(out: Path, data: Path) -> dict:
    """The run's final model scored again by this llmkit's final validation (the whole held-out shard up to
    --final-eval-tokens; bytes counted exactly), so a run written by an older llmkit (which scored the first 64 windows
    and estimated the bytes from the shard's average) compares alike."""
    import llmkit
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.pretrain import Objective, evaluate
    from llmkit.train.runtime import Dist

    config = json.loads((out / "train_config.json").read_text())
    cfg = PretrainConfig(**{k: v for k, v in config.items() if k in PretrainConfig.__dataclass_fields__})
    tok = Tokenizer.load(data)
    if Tokenizer.load(out).fingerprint() != tok.fingerprint():  # a run copied in beside shards of another tokenizer
        raise SystemExit(f"{out} was trained with another tokenizer than {data}'s: give each recipe its own --out")
    return evaluate(llmkit.load(out), Objective(cfg, tok, 0), cfg, data, Dist(), None, final=True)  # fp32, as on a CPU


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", default="1,2,5,10", help="minutes, comma-separated")
    p.add_argument("--out", default="runs/curve")
    args = p.parse_args()
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    for name, (flags, kind, vocab) in RECIPES.items():
        kind, vocab = kind or PretrainConfig().tokenizer_kind, vocab or PretrainConfig().vocab_size
        # the shards a recipe's runs read: prepared once per tokenizer, as `llmkit pretrain` would
        data = out / f"data-{kind}-{vocab}"
        if not (data / "meta.json").exists():
            prepare = out / f"prepare-{kind}-{vocab}"
            cmd = [sys.executable, "-m", "llmkit", "pretrain", "--budget", "1steps", "--out", str(prepare), "--no-samples"]
            subprocess.run(cmd + ["--tokenizer-kind", kind, "--vocab-size", str(vocab)], check=True)
            (prepare / "data").rename(data)
        key = "modern" if "default" in name else "gpt2"
        # the tokenizer in the folder's name: a finished run of another tokenizer is never read as this one
        results[name] = [run(out / f"{key}-{kind}-{vocab}-{m}m", float(m), flags, str(data)) for m in args.budgets.split(",")]
    names = list(results)
    print(f"\n{'minutes':>8} | " + " | ".join(f"{n[:28]:>28}" for n in names) + " | ratio (gpt2 / default)")
    for i, m in enumerate(args.budgets.split(",")):
        a, b = results[names[0]][i]["val_bpb"], results[names[1]][i]["val_bpb"]
        print(f"{m:>8} | {a:>28.3f} | {b:>28.3f} | {a / b:.3f}")
    (out / "curve.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results.items():
        ax.plot([r["minutes"] for r in rows], [r["val_bpb"] for r in rows], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training budget (minutes, 2 CPU cores)")
    ax.set_ylabel("validation bits per byte (held-out plays)")
    ax.set_title("llmkit pretrain on Shakespeare: bits per byte against budget")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    print(f"wrote {out / 'curve.png'} and {out / 'curve.json'}")


if __name__ == "__main__":
    main()
