"""Checkpoints that a kill at any moment cannot spoil, and that resume a run exactly.

    run/checkpoint/        model.safetensors       weights
                           optimizer.safetensors   AdamW moments and step counts, the RNG states (CPU, and the
                                                   rank's CUDA device, of every rank: `rng.torch.R`, `rng.cuda.R`)
                           state.json              step, tokens, elapsed time, best validation loss, optimizer
                                                   hyper-parameters, model config, tokenizer fingerprint, and the
                                                   SHA-256 of both tensor files (checked on resume)

A new checkpoint is written to `checkpoint.tmp/`, then swapped in by two renames (the old one becomes
`checkpoint.prev/` until the new one is in place). Resume takes `checkpoint/`, else `checkpoint.prev/`.
No pickle anywhere: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from llmkit import io
from llmkit.errors import LlmkitError

NAMES = ("model.safetensors", "optimizer.safetensors", "state.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    with io.atomic_open(path, "wb") as f:
        f.write(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors for safetensors, JSON-able rest). Parameters are keyed by index (a plain
    optimizer) or by name (FSDP2's full state dict); `::` separates the key from the state's field."""
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}::{key}"] = value.full_tensor() if hasattr(value, "full_tensor") else value
            else:
                scalars[f"{idx}::{key}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = name.split("::", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU one and its current CUDA device's (dropout and sampling draw there)."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def rank_keys(states: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """`rng_states()` of one rank under the names a checkpoint keeps: rng.torch.R, rng.cuda.R."""
    return {f"{k}.{rank}": v for k, v in states.items()}


def set_rng_states(saved: dict[str, torch.Tensor], rank: int = 0, *, fallback_seed: int | None = None, log=None) -> None:
    """Restore this rank's generators from a checkpoint's `rng` dict (keys `rng.torch.R`, `rng.cuda.R`). A rank the
    checkpoint did not have (the run resumes on more processes) is seeded instead, and says so."""
    cpu = saved.get(f"rng.torch.{rank}")
    if cpu is None:
        if fallback_seed is not None:
            torch.manual_seed(fallback_seed)
        if log is not None:
            log(f"note: the checkpoint holds no random state for rank {rank}; it was seeded afresh (dropout differs from an unbroken run)")
        return
    torch.set_rng_state(cpu)
    cuda = saved.get(f"rng.cuda.{rank}")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(
    run_dir: str | os.PathLike, *, model_state: dict, optimizer_state: dict, state: dict, rng: dict[str, torch.Tensor] | None = None
) -> Path:
    """`rng`: the generators to save (default: this process's, as rank 0)."""
    run_dir = Path(run_dir)
    tmp, final, prev = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.prev"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_tensors(tmp / "model.safetensors", model_state)
    if final.exists() and os.environ.get("LLMKIT_TEST_CHECKPOINT_PAUSE"):  # test hook: stall mid-write so a test can kill -9 here
        import time

        time.sleep(float(os.environ["LLMKIT_TEST_CHECKPOINT_PAUSE"]))
    opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
    opt_tensors.update(rng if rng is not None else rank_keys(rng_states(), 0))
    _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
    state = dict(state, optimizer=opt_rest, sha256={n: _sha256(tmp / n) for n in NAMES[:2]})
    io.write_json(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def resume_point(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite a run or to resume nothing."""
    run_dir = Path(run_dir)
    found = find_checkpoint(run_dir)
    if found is not None and not resume:
        raise LlmkitError(f"{run_dir} already holds a run with a checkpoint", "pass --resume to continue it, or choose a new --out")
    if resume and found is None:
        raise LlmkitError(f"--resume: no checkpoint in {run_dir}", "start without --resume, or point --out at the killed run")
    run_dir.mkdir(parents=True, exist_ok=True)
    return found


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    run_dir = Path(run_dir)
    for name in ("checkpoint", "checkpoint.prev"):
        if (run_dir / name / "state.json").exists():
            return run_dir / name
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state_dict, run state), every file checked against its recorded hash."""
    from safetensors.torch import load_file

    try:
        state = io.read_json(path / "state.json")
    except (ValueError, OSError) as e:
        raise LlmkitError(f"checkpoint {path} is corrupt: state.json does not read ({e})", "start the run again without --resume") from None
    for name in NAMES[:2]:
        file = path / name
        if not file.exists() or _sha256(file) != state.get("sha256", {}).get(name):
            raise LlmkitError(
                f"checkpoint {path} is corrupt: {name} is missing or does not match its recorded hash",
                "start the run again without --resume, or restore the checkpoint folder",
            )
    model_state = load_file(str(path / "model.safetensors"))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    state["rng"] = {k: opt_tensors.pop(k) for k in [k for k in opt_tensors if k.startswith("rng.")]}
    if "rng.torch" in state["rng"]:  # a checkpoint from before per-rank states
        state["rng"]["rng.torch.0"] = state["rng"].pop("rng.torch")
    return model_state, unflatten_optimizer(opt_tensors, state.pop("optimizer")), state
