"""The arena's one-click preference training: the decided battles in the votes database become DPO pairs, `llmkit
finetune --method dpo` trains a LoRA on them in a process of its own (at low priority, beside the engines), and the
trained model is then served beside its base under a new name, so the arena's next battles can draw it against the old.

    POST /arena/train  {"model"?, "steps"?, "beta"?}  -> the job's state (202)
    GET  /arena/train                                -> the job's state: idle, running, loading, ready or failed

One job at a time per server. The run (pairs.jsonl, train.log, the adapter, results.json, metrics.jsonl) is kept in
`arena-dpo/` beside the votes database.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.evaluate.arena import preference_pairs
from llmkit.finetune.preference import read_pairs
from llmkit.model import weights as model_weights
from llmkit.model.compiled import prepare_for_decoding

log = logging.getLogger("llmkit.serve")

MIN_PAIRS = 4  # fewer decided battles than this train nothing worth serving (a tenth is held out to measure)


class TrainingJob:
    """One DPO run from the votes: its process, then the load of what it trained into the server's models."""

    def __init__(self, state, base: str, spec: str, name: str, run_dir: Path, pairs: int, left_out: dict, steps: int, beta: float):
        self.state, self.base, self.spec, self.name, self.run_dir = state, base, spec, name, run_dir
        self.pairs, self.left_out, self.steps, self.beta = pairs, left_out, steps, beta
        self.status = "running"
        self.error: str | None = None
        self.result: dict | None = None
        self.started = time.time()
        self.ended: float | None = None
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, name="llmkit-arena-train", daemon=True)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llmkit",
            "finetune",
            "--model",
            self.spec,
            "--method",
            "dpo",
            "--data",
            str(self.run_dir / "pairs.jsonl"),
            "--budget",
            f"{self.steps}steps",
            "--beta",
            str(self.beta),
            "--forgetting-tasks",
            "none",
            "--general-tokens",
            "512",
            "--out",
            str(self.run_dir),
            "--json",
        ]

    def start(self) -> None:
        out = (self.run_dir / "train.log").open("w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=out, env=env, text=True)
        out.close()
        if hasattr(os, "setpriority"):  # below the engines: the server's answers keep their pace, the training takes the rest
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, 10)
            except OSError:
                pass
        self.thread.start()

    def _run(self) -> None:
        assert self.proc is not None
        stdout, _ = self.proc.communicate()
        try:
            if self.proc.returncode != 0:
                text = (self.run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
                tail = [line for line in text.splitlines() if line.strip()]
                raise LlmkitError(
                    f"the DPO run failed ({tail[-1].strip() if tail else f'exit code {self.proc.returncode}'})",
                    f"see {self.run_dir / 'train.log'}",
                )
            self.result = json.loads(stdout.strip().splitlines()[-1])
            if self.state.closing:
                return
            self.status = "loading"
            self._serve()
            self.status = "ready"
            log.info("arena: %s (DPO on %d pairs from the votes) is served beside %s", self.name, self.pairs, self.base)
        except Exception as e:  # noqa: BLE001  (said on GET /arena/train; the server goes on)
            self.status = "failed"
            self.error = e.message + f" — {e.fix}" if isinstance(e, LlmkitError) else f"{type(e).__name__}: {e}"
            log.error("arena training: %s", self.error)
        finally:
            self.ended = time.time()

    def _serve(self) -> None:
        """The trained adapter, merged into its base, served under `self.name` (eagerly: no compile process beside)."""
        from llmkit.serve.state import Served

        state = self.state
        model = model_weights.load(str(self.run_dir), dtype=state.settings.dtype, device=state.settings.device)
        prepare_for_decoding(model, None, False)
        served = Served(self.name, model, state.settings, state.metrics, False)
        while served.engine is not None and not served.engine.warm.wait(0.5):
            if state.closing:
                served.close()
                return
        state.specs.append((self.name, str(self.run_dir)))
        state.models = {**state.models, self.name: served}  # one assignment: requests see the old dict or the new

    def step(self) -> int:
        """The optimizer steps the run has logged so far (metrics.jsonl)."""
        try:
            lines = (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return 0
        return max((json.loads(line).get("step", 0) for line in lines if line.strip().startswith("{")), default=0)

    def view(self) -> dict:
        out = {
            "status": self.status,
            "base": self.base,
            "model": self.name,
            "pairs": self.pairs,
            "left_out": self.left_out,
            "steps": self.steps,
            "step": self.steps if self.status in ("loading", "ready") else self.step(),
            "beta": self.beta,
            "run": str(self.run_dir),
            "seconds": round((self.ended or time.time()) - self.started, 1),
        }
        if self.error:
            out["error"] = self.error
        if self.result:
            before, after = self.result.get("before", {}), self.result.get("after", {})
            keep = ("loss", "rewards/accuracies", "rewards/margins", "general_bpb")
            out["before"] = {k: before[k] for k in keep if k in before}
            out["after"] = {k: after[k] for k in keep if k in after}
        return out

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


def start_training(state, base: str | None, steps: int, beta: float) -> TrainingJob:
    """Export the votes' pairs and start a DPO run of `base` (default: the first generating model) on them."""
    with _STARTING:  # two clicks at once start one run
        return _start(state, base, steps, beta)


_STARTING = threading.Lock()


def _start(state, base: str | None, steps: int, beta: float) -> TrainingJob:
    from llmkit.serve.state import APIError

    job = state.arena.training
    if job is not None and job.status in ("running", "loading"):
        raise APIError(409, f"a DPO run is already {job.status} ({job.name})", code="training_running")
    generating = [name for name, served in state.models.items() if not served.embedding]
    base = base or (generating[0] if generating else "")
    if base not in generating:
        raise APIError(400, f"{base!r} is not a generating model this server serves ({', '.join(generating) or 'none'})", param="model")
    spec = dict(state.specs).get(base)
    if not isinstance(spec, str):
        raise APIError(400, f"{base!r} was given to the server as a model object, not a name or folder: train it with `llmkit finetune`")
    pairs, left_out = preference_pairs(state.votes.export())
    usable, skipped = read_pairs(pairs)  # what the DPO run will train on: the recipe's own reading
    left_out = {**left_out, **{k: n for k, n in skipped.items() if n}}
    if len(usable) < MIN_PAIRS:
        why = ", ".join(f"{n} {k}" for k, n in left_out.items() if n) or "none"
        raise APIError(
            400,
            f"{len(usable)} usable pairs from the votes so far (left out: {why}): DPO needs at least {MIN_PAIRS} battles where "
            "A or B was better and both answered",
            code="too_few_pairs",
        )
    root = Path(state.settings.db).resolve().parent / "arena-dpo"
    number, stem = 1, re.sub(r"[^A-Za-z0-9._-]+", "-", base)
    while f"{stem}-dpo{number}" in state.models or (root / f"{stem}-dpo{number}").exists():
        number += 1
    name = f"{stem}-dpo{number}"
    run_dir = root / name
    run_dir.mkdir(parents=True)
    io.write_jsonl(run_dir / "pairs.jsonl", pairs)
    job = TrainingJob(state, base, spec, name, run_dir, len(usable), left_out, steps, beta)
    job.start()
    state.arena.training = job
    log.info("arena: DPO of %s on %d pairs from the votes -> %s (%s)", base, len(pairs), name, run_dir)
    return job
