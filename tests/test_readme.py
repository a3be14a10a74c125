"""Every command line of the README, run as written, in order, in a fresh folder that holds a copy of `examples/`.

A line runs with shorter budgets and limits where SHORTER says so (options appended: the last value of an option wins),
and differently only where AS_RUN says why; a line this machine cannot run (eight GPUs, two machines, Ollama) is in
NOT_RUN with the reason and is still parsed by test_cli.py. Each line must exit 0, write what it names (`--out`,
`--json FILE`, `--png`, `--export-*`) and print none of NOISE (tracebacks, raw progress bars of other libraries,
warnings); a server must answer /health on 127.0.0.1 and stop on SIGTERM. The lines run in a subprocess each, as typed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

# What a decoder's fine-tuning measures before and after, on less: 2 validation answers, one untrained task's 1 answer
# and 128 tokens of general text (the README's defaults: 48, four tasks' 24 each and 2,048 tokens).
MEASURE = "--n-val 2 --forgetting-tasks sort --n-forgetting 1 --general-tokens 128"
# README line -> options appended to it: the same command on less work
SHORTER = {
    "llmkit pretrain": "--budget 10steps --final-eval-tokens 4096",
    "llmkit pretrain --preset cpu-gpt --optimizer adamw --schedule cosine --sampling random --tokenizer-kind byte-bpe "
    "--vocab-size 2048 --out runs/gpt2-recipe": "--budget 5steps --final-eval-tokens 4096",
    "llmkit pretrain --model-option activation=swiglu --model-option qk_norm=false --out runs/ablation": "--budget 5steps",
    "llmkit pretrain --family encoder --budget 2m --out runs/bert": "--budget 5steps --final-eval-tokens 4096",
    "llmkit pretrain --budget 30m --max-epochs 8 --out runs/long": "--budget 5steps --final-eval-tokens 4096",
    "llmkit pretrain --out runs/pretrain --resume --budget 10m": "--budget 12steps",  # runs/pretrain trained 10 steps
    # 20 steps: enough that the model answers some questions right and some wrong (the pairs `finetune pairs` makes below)
    "llmkit finetune --model smollm2 --method lora --task arithmetic --budget 100steps --out runs/finetune": (
        f"--budget 20steps --n-train 64 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method full --task arithmetic:2,reverse:1,sort:1 --lr 5e-5 --out runs/ft-mix": (
        f"--budget 1steps --batch-size 4 --n-train 16 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method adapter --task dates --out runs/ft-adapter": f"--budget 2steps --n-train 16 {MEASURE}",
    "llmkit finetune --model minilm --method lora --task genre --budget 200steps --out runs/ft-genre": (
        "--budget 4steps --n-train 16 --n-val 8 --n-forgetting 2 --general-tokens 128"
    ),
    "llmkit finetune --model smollm2 --method lora --data examples/my.jsonl --lora-r 16 --lora-targets q_proj,v_proj --rslora "
    "--out runs/ft-mine": f"--budget 2steps {MEASURE}",
    "llmkit finetune --out runs/finetune --resume": "--budget 22steps",  # likewise runs/finetune (its own options)
    "llmkit finetune compare --model smollm2 --task arithmetic --methods full,lora,multitask-lora --shots 0,3 --curve 100,400": (
        f"--methods lora --shots 0 --curve '' --budget 2steps --n-train 16 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method dpo --data pairs.jsonl --beta 0.1 --out runs/dpo": f"--budget 2steps {MEASURE}",
    "llmkit finetune --model smollm2 --method dpo --loss ipo --data pairs.jsonl --out runs/ipo": f"--budget 1steps {MEASURE}",
    "llmkit finetune --model smollm2 --method orpo --data pairs.jsonl --beta 0.1 --full --out runs/orpo": (
        f"--budget 1steps --batch-size 4 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method grpo --task arithmetic --group-size 4 --budget 20steps --out runs/grpo": (
        f"--budget 1steps --group-size 2 --n-train 8 --max-new-tokens 8 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method grpo --task reverse --reward examples/my_rewards.py:score --grpo-loss dr_grpo "
    "--out runs/grpo2": f"--budget 1steps --group-size 2 --n-train 8 --max-new-tokens 8 {MEASURE}",
    "llmkit finetune pairs --model runs/finetune --task arithmetic --prompts 160 --samples 4 --out runs/pairs.jsonl": (
        "--prompts 24 --max-new-tokens 8"
    ),
    "llmkit finetune compare --model smollm2 --task arithmetic --methods lora,lora+dpo,lora+grpo --budget 40steps --out runs/cmp-pref": (
        f"--methods lora,lora+grpo --shots 0 --budget 1steps --n-train 8 --group-size 2 --max-new-tokens 8 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method qlora --task arithmetic --budget 60steps --out runs/qlora": (
        f"--budget 2steps --n-train 16 {MEASURE}"
    ),
    "llmkit finetune --model smollm2 --method lora --checkpointing --device auto --out runs/ft-gpu": (
        f"--budget 2steps --n-train 16 {MEASURE}"
    ),
    'echo "To be, or not to be" | llmkit generate --model smollm2 --json': "--max-new-tokens 24",
    "llmkit generate --model smollm2 --prompts-file examples/prompts.jsonl --field prompt --json": "--max-new-tokens 24",
    "llmkit generate --task summarize --file examples/text.txt": "--max-new-tokens 24",
    'llmkit generate --task translate --to fr --prompt "The weather is lovely today."': "--max-new-tokens 24",
    'llmkit generate --task write --kind email --prompt "thank the team for the launch"': "--max-new-tokens 24",
    "llmkit eval tasks --model smollm2 --tasks shakespeare_cloze,play,arithmetic --shots 0,5 --out runs/eval --limit 100": "--limit 3",
    "llmkit eval tasks --model runs/finetune --tasks arithmetic,reverse --chat --out runs/eval-sft": "--limit 3",
    "llmkit eval tasks --model smollm2 --tasks play --out runs/eval-play --limit 50": "--limit 3",
    "lm_eval --model llmkit --model_args model=smollm2 --tasks play --include_path runs/eval-play/tasks --limit 50 --device cpu": (
        "--limit 3"
    ),
    "lm_eval --model hf --model_args pretrained=runs/smollm2-hf --tasks play --include_path runs/eval-play/tasks --limit 50 --device cpu": (
        "--limit 3"
    ),
    "llmkit finetune --model minilm --method lora --data examples/glue_data/SST-2/train.tsv --glue sst2 --out runs/minilm-sst2": (
        "--budget 4steps --n-forgetting 2 --general-tokens 128"
    ),
    "llmkit eval glue --task cola,sst2,mrpc,rte --data examples/glue_data --model smollm2 --shots 5 --out runs/glue-smollm2": "--limit 3",
    "llmkit embed train --method word2vec --sg --dim 300 --source shakespeare --out runs/w2v": "--epochs 1",
    "llmkit embed train --method glove --dim 300 --window 10 --epochs 25 --source shakespeare --out runs/glove": "--epochs 2",
}
# README line -> the line run instead, and why
AS_RUN = {
    "llmkit tokenizer train --kind unigram --byte-fallback --vocab-size 1280 --source shakespeare --out runs/uni": (
        "llmkit tokenizer train --kind unigram --byte-fallback --vocab-size 1280 --source shakespeare/tragedies --out runs/uni",
        "a unigram model on all of Shakespeare takes half a minute: the tragedies",
    ),
    "llmkit pretrain --family encoder-decoder --budget 1000steps --out runs/t5": (
        "llmkit pretrain --family encoder-decoder --budget 5steps --data runs/data --out runs/t5",
        "the shards `data prepare` wrote above (their tokenizer has T5's sentinels) instead of a third tokenizer trained",
    ),
    "llmkit embed index --model minilm --source shakespeare --chunk 4lines --out runs/index": (
        "llmkit embed index --model minilm --source shakespeare:hamlet --chunk 4lines --out runs/index",
        "every play's passages take minutes to embed on 2 cores: Hamlet's, where the ghost demands revenge",
    ),
    "llmkit tokenizer compare --source shakespeare --json runs/compare.json": (
        "llmkit tokenizer compare --source shakespeare:hamlet --vocab-size 600 --json runs/compare.json",
        "six tokenizers on all of Shakespeare take minutes: Hamlet, a smaller vocabulary",
    ),
    "llmkit serve --host 0.0.0.0 --allowed-host myserver.lan --port 8080 --api-key-file examples/key.txt --max-batch 16 --max-queue 64": (
        "llmkit serve --allowed-host myserver.lan --port 8080 --api-key-file examples/key.txt --max-batch 16 --max-queue 64",
        "a test binds 127.0.0.1 only",
    ),
    "printf 'FROM ./finetune.gguf\\nPARAMETER temperature 0.7\\n' > runs/Modelfile && ollama create smollm2-arithmetic -f runs/Modelfile": (
        "printf 'FROM ./finetune.gguf\\nPARAMETER temperature 0.7\\n' > runs/Modelfile",
        "Ollama is not on PyPI: the Modelfile is written, not given to Ollama",
    ),
}
NOT_RUN = {
    "torchrun --nproc_per_node 8 -m llmkit pretrain --data runs/data --preset gpt2 --block-size 1024 --batch-size 16": "8 GPUs",
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 -m llmkit pretrain "
    "--data runs/data --preset gpt2 --block-size 1024 --batch-size 16 --fsdp": "two machines",
    "torchrun --nproc_per_node 8 -m llmkit finetune --model smollm2 --method full --fsdp --out runs/ft-fsdp": "8 GPUs",
    "torchrun --nproc_per_node 2 -m llmkit finetune --model smollm2 --method lora --batch-size 4 --out runs/ft-ddp": (
        "two processes of SmolLM2 on 2 cores take minutes; test_finetune.py runs fine-tuning under torchrun"
    ),
}
# README line -> what its output must hold (stdout + stderr), beyond exit 0 and its files: what the README says of it
SAYS = {
    "llmkit model info gpt2": "124,439,808",
    "llmkit data prepare --source 'examples/corpus/*.txt' --tokenizer smollm2 --near-dedup --out runs/corpus": "1 near duplicates dropped",
    'llmkit generate --model smollm2 --chat --greedy --prompt "What is the capital of France?"': "Paris",
    "llmkit finetune --model smollm2 --method lora --task arithmetic --budget 100steps --out runs/finetune": "PEFT format",
    "llmkit eval arena --db examples/votes.db --export-pairs pairs.jsonl --export-kto ratings.jsonl": "ties",
    'llmkit embed search --index runs/index "a ghost demands revenge" --top 5': "hamlet",
    "llmkit eval ab --db examples/votes.db --a smollm2 --b sft --ties exclude": "Wilson interval",
}
# README line -> files in its run folder the README names
FILES = {
    "llmkit pretrain": ["runs/pretrain/" + f for f in ("model.safetensors", "metrics.jsonl", "loss.png", "samples.md", "report.md")],
    "llmkit finetune --model smollm2 --method lora --task arithmetic --budget 100steps --out runs/finetune": [
        "runs/finetune/adapter_config.json",
        "runs/finetune/adapter_model.safetensors",
        "runs/finetune/results.json",
    ],
}
NOISE = ("Traceback", "it/s]", "Graph break", "UserWarning", "FutureWarning", "DeprecationWarning")
OUTPUT_OPTIONS = ("--out", "--json", "--png", "--export-pairs", "--export-kto")


def readme_lines() -> list[str]:
    """The command lines of the README's bash blocks in order, without their comments (continuations joined; `make`
    and `source` left out: the set-up has run them)."""
    lines, block, text = [], False, ROOT.joinpath("README.md").read_text(encoding="utf-8")
    for raw in re.sub(r"\\\n\s*", "", text).splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        line = re.sub(r"\s+# .*$", "", raw.strip())  # the line's comment: what it does, not part of the command
        if block and line and not line.startswith(("#", "make ", "source ")):
            lines.append(line)
    return lines


def written(argv: list[str]) -> list[str]:
    """The files or folders a command line names as its output."""
    out = []
    for i, arg in enumerate(argv[:-1]):
        if arg in OUTPUT_OPTIONS and not argv[i + 1].startswith("-"):
            out.append(argv[i + 1])
    return out


def serve_and_stop(line: str, folder: Path, env: dict) -> None:
    port = free_port()
    argv = [*shlex.split(line, comments=True), "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ok = time.monotonic() + 600, False
        while time.monotonic() < deadline and proc.poll() is None and not ok:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(1)
        assert ok, f"{line}: no /health on 127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{line}: exit {proc.returncode}\n{out[-3000:]}"


def command_env() -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    return env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_line(line: str, folder: Path, env: dict) -> str:
    """Run one README line in `folder` (shortened or replaced as the tables say); returns what ran."""
    run = AS_RUN[line][0] if line in AS_RUN else line
    if line in SHORTER:
        run = f"{run} {SHORTER[line]}"
    if run.startswith("llmkit serve"):
        serve_and_stop(run, folder, env)
        return run
    before = {path: _mtime(folder / path) for path in written(shlex.split(run.split("|")[-1], comments=True))}
    stdin = None
    if run.startswith("llmkit chat"):  # a person's turn, then /exit
        stdin, run = "What is 2 + 2?\n/exit\n", f"{run} --max-new-tokens 16"
    proc = subprocess.run(run, shell=True, cwd=folder, env=env, input=stdin, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{run}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ours = shlex.split(run.split("|")[-1])[0] == "llmkit"  # lm-eval's own command line keeps its own bars
    noise = [n for n in NOISE if ours and n in proc.stderr]  # what a library prints past llmkit's own lines
    assert not noise, f"{run}: {noise} in\n{proc.stderr[-3000:]}"
    for path, then in before.items():  # written by this line (a resumed run rewrites its folder)
        assert (folder / path).exists() and _mtime(folder / path) != then, f"{run}: wrote no {path}"
    for path in FILES.get(line, []):
        assert (folder / path).exists(), f"{run}: wrote no {path}"
    assert SAYS.get(line, "") in proc.stdout + proc.stderr, f"{run}: no {SAYS[line]!r} in\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return run


def _mtime(path: Path) -> int | None:
    """A file's or folder's modification time (a folder's changes when a file in it is written atomically)."""
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.slow
def test_every_readme_command_runs_as_written_in_order(tmp_path):
    lines = readme_lines()
    for table in (SHORTER, AS_RUN, NOT_RUN, SAYS, FILES):  # a row for a line the README no longer has is a stale promise
        assert not set(table) - set(lines), set(table) - set(lines)
    folder = tmp_path / "fresh"
    shutil.copytree(ROOT / "examples", folder / "examples")
    env = command_env()
    for line in lines:
        if line in NOT_RUN:
            continue
        start = time.monotonic()
        run = run_line(line, folder, env)
        with open(tmp_path / "times.txt", "a", encoding="utf-8") as f:  # seconds per line, as they finish
            f.write(f"{time.monotonic() - start:7.1f}  {run}\n")
