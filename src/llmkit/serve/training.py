"""The arena's one-click preference training: the decided battles in the votes database become DPO pairs, `llmkit
finetune --method dpo` trains a LoRA on them in a process of its own (at low priority, beside the engines), and the
trained model is then served beside its base under a new name, so the arena's next battles can draw it against the old.

    POST /arena/train  {"model"?, "steps"?, "beta"?}  -> the job's state (202)
    GET  /arena/train                                -> the job's state: idle, running, loading, ready or failed

One job at a time per server, and at most MAX_TRAINED trained models served beside the others (each is a whole model
in memory). The run (pairs.jsonl, train.log, the adapter, results.json, metrics.jsonl) is kept in `arena-dpo/` beside
the votes database.
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
from llmkit.finetune.preference import MIN_PAIRS, read_pairs
from llmkit.finetune.recipe import split_pairs_by_prompt
from llmkit.model import weights as model_weights
from llmkit.model.compiled import prepare_for_decoding

log = logging.getLogger("llmkit.serve")

MAX_TRAINED = 3  # trained models one server adds; a restart clears them (their run folders stay)


class TrainingJob:
    """One DPO run from the votes: its process, then the load of what it trained into the server's models."""

    def __init__(self, state, base: str, spec: str, name: str, run_dir: Path, pairs: tuple[int, int], left_out: dict, steps: int, beta):
        """`pairs`: (training, held out) after the run's own split."""
        self.state, self.base, self.spec, self.name, self.run_dir = state, base, spec, name, run_dir
        (self.pairs, self.held_out), self.left_out, self.steps, self.beta = pairs, left_out, steps, beta
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
            "--device",
            self.state.settings.device or "cpu",  # where the server runs its models, not a GPU it did not ask for
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
            if self.state.closing and self.proc.returncode != 0:  # stopped by close(): said, not called a failure
                self.status = "cancelled"
                log.info("arena: the DPO run of %s was stopped with the server (its folder: %s)", self.name, self.run_dir)
                return
            if self.proc.returncode != 0:
                text = (self.run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
                tail = [line for line in text.splitlines() if line.strip()]
                raise LlmkitError(
                    f"the DPO run failed ({tail[-1].strip() if tail else f'exit code {self.proc.returncode}'})",
                    f"see {self.run_dir / 'train.log'}",
                )
            self.result = json.loads(stdout.strip().splitlines()[-1])
            if self.state.closing:
                self.status = "cancelled"
                return
            self.status = "loading"
            if not self._serve():
                return
            self.status = "ready"
            log.info("arena: %s (DPO on %d pairs from the votes) is served beside %s", self.name, self.pairs, self.base)
        except Exception as e:  # noqa: BLE001  (said on GET /arena/train; the server goes on)
            self.status = "failed"
            self.error = e.message + f" — {e.fix}" if isinstance(e, LlmkitError) else f"{type(e).__name__}: {e}"
            log.error("arena training: %s", self.error)
        finally:
            self.ended = time.time()

    def _serve(self) -> bool:
        """The trained adapter, merged into its base, served under `self.name` (eagerly: no compile process beside);
        False when the server began to close meanwhile."""
        from llmkit.serve.state import Served

        state = self.state
        model = model_weights.load(str(self.run_dir), dtype=state.settings.dtype, device=state.settings.device)
        prepare_for_decoding(model, state.settings.quantize, False)  # the served models' weights: a battle compares training
        served = Served(self.name, model, state.settings, state.metrics, False)
        if served.engine is not None:
            served.engine.warm.wait(60)
        with state.adding:  # close() takes it too: a model is added before the server closes, or not at all
            if state.closing:
                served.close()
                return False
            state.specs.append((self.name, str(self.run_dir)))
            state.models = {**state.models, self.name: served}  # one assignment: requests see the old dict or the new
        return True

    def step(self) -> int:
        """The optimizer steps the run has logged so far (metrics.jsonl)."""
        try:
            lines = (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return 0
        steps = []
        for line in lines:
            try:
                steps.append(json.loads(line).get("step", 0))
            except ValueError:  # the line being written
                pass
        return max(steps, default=0)

    def view(self) -> dict:
        out = {
            "status": self.status,
            "base": self.base,
            "model": self.name,
            "pairs": self.pairs,
            "left_out": self.left_out,
            "steps": self.steps,
            "step": self.result["steps"] if self.result else self.step(),
            "held_out": self.held_out,
            "beta": self.beta,
            "run": str(self.run_dir),
            "seconds": round((self.ended or time.time()) - self.started, 1),
        }
        if self.error:
            out["error"] = self.error
        if self.result:
            before, after = self.result.get("before", {}), self.result.get("after", {})
            keep = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "general_bpb")
            out["before"] = {k: before[k] for k in keep if k in before}
            out["after"] = {k: after[k] for k in keep if k in after}
        return out

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


_STARTING = threading.Lock()


def start_training(state, base: str | None, steps: int, beta: float) -> TrainingJob:
    """Export the votes' pairs and start a DPO run of `base` (default: the first generating model) on them."""
    with _STARTING:  # two clicks at once start one run
        return _start(state, base, steps, beta)


def _start(state, base: str | None, steps: int, beta: float) -> TrainingJob:
    from llmkit.serve.state import APIError

    state.check_ready()
    job = state.arena.training
    if job is not None and job.status in ("running", "loading"):
        raise APIError(409, f"a DPO run is already {job.status} ({job.name})", code="training_running")
    trained = [name for name, spec in state.specs if isinstance(spec, str) and "arena-dpo" in Path(spec).parts]
    if len(trained) >= MAX_TRAINED:
        raise APIError(
            409, f"this server already serves {len(trained)} models trained on the votes ({', '.join(trained)}): restart it to clear them",
            code="too_many_trained",
        )  # fmt: skip
    generating = [name for name, served in state.models.items() if not served.embedding]
    base = base or (generating[0] if generating else "")
    if base not in generating:
        raise APIError(
            404, f"{base!r} is not a generating model this server serves ({', '.join(generating) or 'none'})", param="model",
            code="model_not_found",
        )  # fmt: skip
    spec = dict(state.specs).get(base)
    if not isinstance(spec, str):
        raise APIError(400, f"{base!r} was given to the server as a model object, not a name or folder: train it with `llmkit finetune`")
    pairs, left_out = preference_pairs(state.votes.export())
    usable, skipped = read_pairs(pairs)  # what the DPO run will train on: the recipe's own reading
    left_out = {**left_out, **{k: n for k, n in skipped.items() if n}}
    why = ", ".join(f"{n} {k}" for k, n in left_out.items() if n) or "none"
    if len(usable) < MIN_PAIRS:
        raise APIError(
            400,
            f"{len(usable)} usable pairs from the votes so far (left out: {why}): DPO needs at least {MIN_PAIRS} battles where "
            "A or B was better and both answered",
            code="too_few_pairs",
        )
    used = {p.meta["battle_id"] for p in usable}  # each exported pair names its battle
    kept = [r for r in pairs if r["battle_id"] in used]
    try:  # the run's own split: whole prompts held out, so at least two distinct prompts
        train, val = split_pairs_by_prompt(kept, seed=0)
    except LlmkitError as e:
        raise APIError(400, f"{e.message} ({len(usable)} usable pairs): vote on battles of other prompts", code="too_few_pairs") from None
    root = Path(state.settings.db).resolve().parent / "arena-dpo"
    number, stem = 1, re.sub(r"[^A-Za-z0-9._-]+", "-", base)
    while f"{stem}-dpo{number}" in state.models or (root / f"{stem}-dpo{number}").exists():
        number += 1
    name = f"{stem}-dpo{number}"
    run_dir = root / name
    run_dir.mkdir(parents=True)
    io.write_jsonl(run_dir / "pairs.jsonl", kept)
    job = TrainingJob(state, base, spec, name, run_dir, (len(train), len(val)), left_out, steps, beta)
    job.start()
    state.arena.training = job
    log.info("arena: DPO of %s on %d pairs from the votes (%d more held out) -> %s (%s)", base, len(train), len(val), name, run_dir)
    return job
