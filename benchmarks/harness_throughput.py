"""lm-evaluation-harness throughput: llmkit's `LlmkitLM` against lm-eval's own `hf` model on the same model (SmolLM2's
Hugging Face export) and the same requests, in one run on this machine; and the wall time of the built-in task suite.

    python benchmarks/harness_throughput.py                  # 2 threads, CPU
    python benchmarks/harness_throughput.py --limit 40 --threads 2

Requests: the built-in tasks' own (multiple choice: shakespeare_cloze and play, 4 and 6 choices; generation: arithmetic),
built by lm-eval from the task YAML; each engine answers the same list; requests per second and the ratio are printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build_requests(folder: Path, tasks: list[str], limit: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(folder))
    out = {}
    for name, task in get_task_dict(tasks, manager).items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out[name] = task.instances
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=40, help="examples per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from llmkit.cli import main as llmkit_main
    from llmkit.evaluate.harness import LlmkitLM
    from llmkit.evaluate.tasks import offline, run_tasks, write_builtin_tasks

    offline()
    tmp = Path(tempfile.mkdtemp())
    llmkit_main(["model", "export", "--model", "smollm2", "--out", str(tmp / "hf")])
    folder = write_builtin_tasks(tmp / "tasks", ["shakespeare_cloze", "play", "arithmetic"])
    requests = build_requests(folder, ["shakespeare_cloze", "play", "arithmetic"], args.limit)
    engines = {
        "llmkit": LlmkitLM(model="smollm2", batch_size=args.batch_size),
        "hf": HFLM(pretrained=str(tmp / "hf"), batch_size=args.batch_size, device="cpu", dtype="float32"),
    }
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, batch {args.batch_size}, {args.limit} examples per task")
    rates = {}
    for task, instances in requests.items():
        kind = instances[0].request_type
        for name, lm in engines.items():
            seconds = timed(lambda: getattr(lm, kind)(instances, disable_tqdm=True))
            rates[(task, name)] = len(instances) / seconds
            print(
                f"{task:<18} {kind:<15} {name:<7} {len(instances):>4} requests in {seconds:6.2f}s: {rates[(task, name)]:7.2f} requests/s",
                flush=True,
            )
        print(f"{task:<18} llmkit / hf: {rates[(task, 'llmkit')] / rates[(task, 'hf')]:.2f}x")
    seconds = timed(
        lambda: run_tasks(
            "smollm2",
            ["shakespeare_cloze", "play", "arithmetic", "reverse", "sort", "dates"],
            shots=[0],
            out=tmp / "suite",
            limit=args.limit,
            log=lambda m: None,
        )
    )
    print(f"built-in suite (6 tasks x {args.limit} examples, 0-shot) on SmolLM2 through `llmkit eval tasks`: {seconds:.1f}s")


if __name__ == "__main__":
    main()
