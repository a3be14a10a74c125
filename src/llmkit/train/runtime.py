"""What every training recipe runs on (pretraining, fine-tuning, and the next ones): the budget and the learning-rate
schedule, precision (autocast) and the machine's peak, the processes (torchrun: DDP / FSDP2), one optimizer step's
gradients accumulated over micro-batches with every target token weighing alike, and the run's metrics.

    Budget        "5m", "2000steps", "5Mtokens", "300s,1000steps": when a run stops, and how far it is (0..1)
    lr_scale      linear warmup, then cosine or warmup-stable-decay, as a share of each parameter group's peak
    autocast_dtype  bf16 / fp16 / fp32, "auto" measured on a CPU; peak_flops: for MFU
    Dist          this process's rank, world and device; all_reduce / all_gather / barrier (no-ops for one process)
    accumulate_gradients  backward over the micro-batches of one optimizer step
    Metrics       metrics.jsonl and the loss curve's PNG

A recipe imports from here and from `llmkit.train.optim`, never from another recipe.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit import io
from llmkit.devices import default_dtype
from llmkit.errors import LlmkitError

# --- budget and schedule --------------------------------------------------------------------------------


TIME_BUDGET_EPOCHS = 4.0  # the epoch limit of a budget of time alone (--max-epochs)


@dataclass
class Budget:
    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    epochs: float | None = None  # a limit in passes over the data: `epoch_tokens` tokens each (set once the data is known)
    epoch_tokens: int | None = None

    def limit_epochs(self, max_epochs: float | None, epoch_tokens: int) -> None:
        """`max_epochs` (--max-epochs): None takes TIME_BUDGET_EPOCHS for a budget of time alone (a step or token count
        is kept exact, as Hugging Face's max_steps overrides its epochs), 0 no limit."""
        time_alone = self.seconds is not None and self.steps is None and self.tokens is None
        self.epochs = (TIME_BUDGET_EPOCHS if time_alone else None) if max_epochs is None else (max_epochs or None)
        self.epoch_tokens = epoch_tokens

    @property
    def epoch_limit(self) -> int | None:
        """The epoch limit in tokens, or None."""
        return max(1, math.ceil(self.epochs * self.epoch_tokens)) if self.epochs and self.epoch_tokens else None

    @classmethod
    def parse(cls, spec: str) -> Budget:
        b = cls()
        for part in str(spec).replace(" ", "").lower().split(","):
            m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|sec|m|min|h|steps?|k?m?b?tok(?:ens)?|[kmb]tok(?:ens)?)?", part)
            if not m:
                raise LlmkitError(f"cannot read the budget {part!r}", "use e.g. 5m, 300s, 1h, 2000steps or 5Mtokens")
            value, unit = float(m.group(1)), m.group(2) or "steps"
            if unit in ("s", "sec"):
                b.seconds = value
            elif unit in ("m", "min"):
                b.seconds = value * 60
            elif unit == "h":
                b.seconds = value * 3600
            elif unit.startswith("step"):
                b.steps = int(value)
            else:
                scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(unit[0], 1)
                b.tokens = int(value * scale)
        return b

    def progress(self, step: int, tokens: int, seconds: float) -> float:
        """How much of the budget is used, 0..1 (the largest share of any limit)."""
        parts = [
            step / self.steps if self.steps else 0,
            tokens / self.tokens if self.tokens else 0,
            seconds / self.seconds if self.seconds else 0,
            tokens / self.epoch_limit if self.epoch_limit else 0,
        ]
        return min(1.0, max(parts))

    def exhausted(self, step, tokens, seconds) -> str | None:
        if self.epoch_limit and tokens >= self.epoch_limit:
            return f"{self.epochs:g} epochs of the training windows reached (--max-epochs)"
        if self.steps and step >= self.steps:
            return f"budget of {self.steps} steps reached"
        if self.tokens and tokens >= self.tokens:
            return f"budget of {self.tokens:,} tokens reached"
        if self.seconds and seconds >= self.seconds:
            return f"time budget of {self.seconds:.0f}s reached"
        return None


def lr_scale(cfg, step: int, progress: float, warm_progress: float = 0.0) -> float:
    """The learning rate as a share of its peak (every parameter group's peak: AdamW's lr, Muon's muon_lr).

    Linear warmup over `cfg.warmup` steps, then `cfg.schedule`:

        cosine   decay to `min_lr_ratio` over the rest of the budget; `progress` is the share of the budget used
                 (0..1), `warm_progress` the share used when warmup ended (warmup / steps for a step budget; measured
                 for time and token budgets), so the cosine starts at its top exactly where warmup ends: no jump.
        wsd      warmup-stable-decay (Hu et al. 2024, MiniCPM; modded-nanogpt): the peak until the last `cooldown` of
                 the budget, then a straight line down to `min_lr_ratio`.

        lr │    ╱‾‾‾‾‾‾──╮                    lr │    ╱‾‾‾‾‾‾‾‾‾‾‾‾╲
           │   ╱          ╲___    cosine         │   ╱              ╲      wsd
           │  ╱                ‾‾‾──             │  ╱                 ╲──
           └──┴──────────────────────►           └──┴──────────────────►
             warmup          budget used           warmup    cooldown
    """
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    floor = cfg.min_lr_ratio
    if getattr(cfg, "schedule", "cosine") == "wsd":
        start = max(1.0 - cfg.cooldown, warm_progress)  # a warmup that ran into the cooldown hands over to it at the peak
        return floor + (1 - floor) * min(1.0, max(0.0, (1.0 - progress) / max(1.0 - start, 1e-9)))
    decay = min(1.0, max(0.0, (progress - warm_progress) / max(1.0 - warm_progress, 1e-9)))
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * decay))


def learning_rate(cfg, step: int, progress: float, warm_progress: float = 0.0) -> float:
    """AdamW's learning rate at this point of the run: `cfg.lr` x `lr_scale` (see there)."""
    return cfg.lr * lr_scale(cfg, step, progress, warm_progress)


# --- hardware --------------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device, *, measure: bool = False):
    """The autocast dtype for `precision` on `device`, or None for float32. `auto` on a CPU with bf16 instructions:
    bf16 when `measure` finds its matmuls at least 1.15x float32's on this machine (on some VMs with AVX512-BF16 they
    are slower: 161 against 286 GFLOP/s), float32 otherwise; without `measure` (several processes must agree) bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":  # the device's own dtype: bf16 from compute capability 8 on, else fp16 (loss scaled)
        return default_dtype(device)
    if not cpu_has_bf16():
        return None
    return torch.bfloat16 if not measure or bf16_pays_on_cpu() else None


_BF16_PAYS: list[bool] = []


def bf16_pays_on_cpu() -> bool:
    """Whether bf16 matmuls run at least 1.15x float32's on this CPU (measured once per process)."""
    if not _BF16_PAYS:
        cpu = torch.device("cpu")
        _BF16_PAYS.append(peak_flops(cpu, torch.bfloat16)[0] >= 1.15 * peak_flops(cpu, torch.float32)[0])
    return _BF16_PAYS[0]


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype) -> tuple[float, str]:
    """Dense peak FLOP/s: a datasheet figure for known GPUs, else a measured matmul rate on this machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} datasheet (bf16 dense)"
    n = 1024
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(
        device=device, dtype=dtype or torch.float32
    )  # leaves the global RNG alone
    for _ in range(2):
        a @ a
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start), f"measured {n}x{n} matmul on {device.type}"


# --- distributed ------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:  # share the cores between the processes of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(dist.get_rank(), world, local_rank, torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu"))


def all_reduce(values: list[float], d: Dist, op: str = "sum") -> list[float]:
    """Sum (or max) of each value over the ranks; every rank gets the result."""
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- one optimizer step ---------------------------------------------------------------------------------------


def accumulate_gradients(
    train_model, micro: list, loss_sum_fn, counts: list[int], d: Dist, amp, scaler=None, sharded: bool = False
) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, weighting every target token alike: each micro-batch's
    summed loss (`loss_sum_fn(m)`, over `counts[i]` targets) is divided by the count of targets in the whole step, over
    every micro-batch of every rank (a micro-batch with 3 targets weighs 3/40 of one with 40, not as much, unlike a mean
    per micro-batch). DDP and FSDP average gradients over ranks, so the local loss is scaled by the world size.
    Returns (this rank's summed loss, the global target count). Pretraining and fine-tuning both step through here."""
    total = int(all_reduce([float(sum(counts))], d)[0])
    loss_sum = 0.0
    for i, m in enumerate(micro):
        sync = i == len(micro) - 1 or d.world == 1 or sharded
        ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else contextlib.nullcontext()
        with ctx:
            with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_sum_fn(m)
            scaled = loss * (d.world / max(total, 1))
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.item()
    return loss_sum, total


# --- metrics ---------------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl (one JSON object per logged step) and the loss-curve PNG."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        self.rows: list[dict] = []
        if enabled and resume_step is not None and self.path.exists():  # drop what a killed run logged after its checkpoint
            rows = io.read_jsonl(self.path)
            self.rows = [r for r in rows if r["step"] <= resume_step and not r.get("final")]  # a finished run's last score goes too
            io.write_jsonl(self.path, self.rows)
        elif enabled:
            io.write_text(self.path, "")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        io.append_jsonl(self.path, row)

    def plot(self, path: Path, title: str = "pretraining loss") -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if r.get("split") == "train"]
        val = [(r["step"], r["loss"]) for r in self.rows if r.get("split") == "val" and not r.get("final")]
        final = [r for r in self.rows if r.get("split") == "val" and r.get("final")]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if train:
            ax.plot(*zip(*train), label="train", alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        for r in final:
            ax.plot([r["step"]], [r["loss"]], "*", markersize=14, label=f"final: {r.get('windows', '?')} validation windows")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        io.save_figure(fig, path)
        plt.close(fig)
