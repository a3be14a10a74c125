"""Benchmark tasks through lm-evaluation-harness: llmkit's built-in offline tasks (lm-eval YAML + JSONL generated from
the embedded Shakespeare and the fine-tuning tasks, with a seed), any task YAML with local data files, and the runner
behind `llmkit eval tasks`.

    shakespeare_cloze   the true next line of a passage among 4 lines of the same play       multiple choice: acc, acc_norm
    play                which of six plays a line comes from                                  multiple choice: acc, acc_norm
    arithmetic, reverse, sort, dates   the fine-tuning tasks, answered by generation          exact match

Each task has a `train` split (few-shot examples, drawn with lm-eval's seeded sampler) and a `validation` split
(scored); the two never share a passage or a prompt. Nothing is downloaded: the datasets are JSON files on disk and
the hub switches are off (`offline()`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from llmkit import io
from llmkit.errors import LlmkitError

BUILTIN = ("shakespeare_cloze", "play", "arithmetic", "reverse", "sort", "dates")
GENERATION_TASKS = ("arithmetic", "reverse", "sort", "dates")


def offline() -> None:
    """Never wait on a network: datasets, the hub and transformers read local files only."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[key] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- the built-in tasks' data ---------------------------------------------------------------------------------------


def _cloze_docs(split: str, n: int, seed: int) -> list[dict]:
    """A passage of 3 speech lines, the true next line and 3 other lines of the same play. Validation passages come
    from the last fifth of each play, training (few-shot) ones from the rest."""
    from llmkit.data.sources import shakespeare

    rng = random.Random(f"cloze-{split}-{seed}")
    plays = []
    for doc in shakespeare():
        lines = [ln.strip() for ln in doc.text.splitlines() if len(ln.strip()) >= 25 and not ln.strip().endswith(":")]
        cut = int(len(lines) * 0.8)
        plays.append(lines[:cut] if split == "train" else lines[cut:])
    docs: list[dict] = []
    seen: set = set()
    while len(docs) < n:
        lines = rng.choice(plays)
        i = rng.randrange(3, len(lines))
        if (id(lines), i) in seen:
            continue
        seen.add((id(lines), i))
        others = rng.sample([ln for j, ln in enumerate(lines) if abs(j - i) > 3 and ln != lines[i]], 3)
        choices = others + [lines[i]]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(lines[i - 3 : i]), "choices": choices, "gold": choices.index(lines[i])})
    return docs


def _play_docs(split: str, n: int, seed: int) -> list[dict]:
    from llmkit.data.tasks import play_lines

    rng = random.Random(f"play-{split}-{seed}")
    lines = play_lines()
    titles = sorted(lines)
    docs: list[dict] = []
    seen: set = set()
    pool = sum(len(set(lines[t][0 if split == "train" else 1])) for t in titles)
    while len(docs) < min(n, pool):  # without repeats
        title = rng.choice(titles)
        line = rng.choice(lines[title][0 if split == "train" else 1])
        if (title, line) not in seen:
            seen.add((title, line))
            docs.append({"line": line, "choices": titles, "gold": titles.index(title)})
    return docs


def _generation_docs(task: str, split: str, n: int, seed: int) -> list[dict]:
    from llmkit.data.tasks import task_examples

    return [
        {"question": (ex.messages or [{}])[0]["content"], "answer": ex.answer}
        for ex in task_examples(task, n, "val" if split == "validation" else "train", seed)
    ]


def _yaml(task: str, folder: Path) -> dict:
    files = {"train": str(folder / f"{task}.train.jsonl"), "validation": str(folder / f"{task}.validation.jsonl")}
    common = {
        "task": task,
        "tag": ["llmkit"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "training_split": "train",
        "fewshot_split": "train",
        "validation_split": "validation",
        "metadata": {"version": 1.0},
    }
    if task == "shakespeare_cloze":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}\n",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    if task == "play":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": 'Which Shakespeare play is this line from?\n"{{line}}"\nAnswer:',
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return {
        **common,
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "Question:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True, "ignore_punctuation": False}
        ],
    }  # a sign, a date's dashes or a word's apostrophe count


def write_builtin_tasks(folder: str | Path, names=BUILTIN, *, seed: int = 0, n_validation: int = 200, n_train: int = 50) -> Path:
    """The built-in tasks as lm-eval YAML files and JSONL data in `folder` (deterministic in `seed`)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in names:
        for split, n in (("train", n_train), ("validation", n_validation)):
            if task == "shakespeare_cloze":
                docs = _cloze_docs(split, n, seed)
            elif task == "play":
                docs = _play_docs(split, n, seed)
            else:
                docs = _generation_docs(task, split, n, seed)
            io.write_jsonl(folder / f"{task}.{split}.jsonl", docs)
        io.write_text(folder / f"{task}.yaml", yaml.safe_dump(_yaml(task, folder), sort_keys=False, allow_unicode=True))
    return folder


# --- the runner -------------------------------------------------------------------------------------------------------


def _task_names_in(folder: Path) -> list[str]:
    import yaml

    names = []
    for f in sorted(folder.glob("**/*.yaml")):
        try:
            spec = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError:  # lm-eval's own tags (!function) are fine for lm-eval; we only need the name
            spec = {k: v for k, v in (line.split(":", 1) for line in f.read_text().splitlines() if line.startswith("task:"))}
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            names.append(spec["task"].strip())
    return names


def resolve(tasks: list[str], include_path: list[str] | None, folder: Path, seed: int) -> tuple[list[str], list[str]]:
    """(task names, include paths): built-in names (written into `folder`), folders of YAML (every task in them), or task
    names found in `include_path`."""
    names, paths = [], [str(p) for p in include_path or []]
    builtin = [t for t in tasks if t in BUILTIN]
    if builtin:
        write_builtin_tasks(folder, builtin, seed=seed)
        paths.append(str(folder))
    for t in tasks:
        if t in BUILTIN:
            names.append(t)
        elif Path(t).is_dir():
            found = _task_names_in(Path(t))
            if not found:
                raise LlmkitError(
                    f"the folder {t} holds no lm-eval task YAML (a file with a `task:` name)",
                    "point --tasks at a folder of task YAML files",
                )
            names += found
            paths.append(str(Path(t)))
        else:
            names.append(t)
    return names, paths


def run_tasks(
    model,
    tasks: list[str],
    *,
    shots: list[int],
    out: str | Path,
    limit: int | float | None = None,
    include_path: list[str] | None = None,
    chat: bool = False,
    batch_size: int = 8,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    device: str | None = None,
    log=print,
) -> dict:
    """Evaluate `model` (a name, a path or a loaded model, on `device`) on `tasks` at each number of `shots`; writes
    OUT/results.json (and OUT/tasks/, OUT/cache/: a re-run, after a kill too, reuses every request already answered)."""
    offline()
    import logging

    import datasets
    import lm_eval.evaluator
    import lm_eval.loggers.utils
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for module in (lm_eval.evaluator, lm_eval.loggers.utils):  # it runs `git` in the working folder, which need not be a repository
        module.get_git_commit_hash = lambda: None
    datasets.disable_progress_bars()  # llmkit prints its own lines; lm-eval's notes stay in its log at WARNING
    import lm_eval.api.model
    import lm_eval.api.task
    import tqdm

    def quiet(*args, **kwargs):  # its bars over microseconds of work were raw lines in a log (and the demo's)
        return tqdm.tqdm(*args, **{**kwargs, "disable": True})

    for module in (lm_eval.api.model, lm_eval.api.task):
        if getattr(module, "tqdm", None) is tqdm.tqdm:  # `from tqdm import tqdm` there; another layout is left alone
            module.tqdm = quiet
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from llmkit.evaluate.harness import LlmkitLM

    out = Path(out)
    names, paths = resolve(tasks, include_path, out / "tasks", seed)
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LlmkitError(
            f"unknown task(s): {', '.join(unknown)}",
            f"use built-in tasks ({', '.join(BUILTIN)}), a folder of task YAML, or --include-path DIR for your own",
        )
    lm = LlmkitLM(model=model, batch_size=batch_size, device=device)
    summary: dict[str, Any] = {"model": lm.name, "tasks": names, "shots": {}, "limit": limit, "chat": chat, "seed": seed}
    for k in shots:
        log(f"{lm.name}: {', '.join(names)} with {k} shot(s)")
        result = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=k,
            limit=limit,
            task_manager=manager,
            use_cache=str(out / "cache" / f"{lm.tokenizer_name}-{lm.fingerprint}-{k}shot-{'chat' if chat else 'plain'}"),
            apply_chat_template=chat,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
        summary["shots"][str(k)] = {
            "results": result["results"],
            "n-samples": result.get("n-samples", {}),
            "higher_is_better": result.get("higher_is_better", {}),
        }
    io.write_json(out / "results.json", json.loads(json.dumps(summary, default=str)))
    return summary
