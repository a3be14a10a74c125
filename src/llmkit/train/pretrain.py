"""`llmkit pretrain`: train a decoder, an encoder or an encoder-decoder from random weights.

The recipe reads top to bottom (torchtune style): setup -> train -> cleanup.

    setup     distributed init (torchrun), data (prepared shards, or Shakespeare prepared on the spot), tokenizer,
              model from a preset, AdamW (weight decay on matrices only), resume from a checkpoint
    train     per step: lr from warmup + cosine, grad_accum micro-batches (bf16 autocast where the CPU/GPU has it),
              clip, step; every eval_every steps: validation loss / perplexity / bits per byte, samples (decoders),
              checkpoint, plateau check; stop on the budget (steps, tokens, time) or the plateau, and say which
    cleanup   final weights (config.json + model.safetensors + tokenizer), metrics.jsonl, loss.png, report.md

Scale-out: `torchrun --nproc_per_node N -m llmkit pretrain ...` runs DDP (FSDP2 with --fsdp); every rank takes its
rows of the same global batch, so N processes follow the loss curve of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.train import objectives

DEFAULT_PRESETS = {"decoder": "cpu-modern", "encoder": "tiny-bert", "encoder-decoder": "tiny-t5"}


@dataclass
class PretrainConfig:
    family: str = "decoder"
    preset: str | None = None  # default: cpu-modern / tiny-bert / tiny-t5
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    data: str = "shakespeare"  # a prepared shard folder, or a source to prepare (shakespeare, files, globs)
    # for data prepared here: a unigram with byte fallback (5 minutes, 3 seeds, exact bits per byte on the held-out plays:
    # 2.036 against 2.051 for a byte-level BPE of 1,024; 2 minutes: byte-bpe 1,024 2.160, 1,280 2.166, unigram 1,280
    # 2.150, 1,536 2.154; benchmarks/RESULTS.md, "Speed, part 2")
    tokenizer_kind: str = "unigram"
    vocab_size: int = 1280  # with the 256 byte tokens: 1,015 pieces besides them and 9 special tokens
    block_size: int = 128
    batch_size: int = 32  # per process and micro-step
    # training windows: shuffle (each window once per epoch, in a random order) | random (anywhere, independently; nanoGPT).
    # 5 minutes, exact bits per byte on the first 64 validation windows: shuffle 2.017 against random 2.036 (means of 4
    # and 3 runs; benchmarks/RESULTS.md)
    sampling: str = "shuffle"
    grad_accum: int = 1
    lr: float = 3e-3  # AdamW's: embeddings, the head, norms and biases (and every parameter with --optimizer adamw)
    embedding_lr: float | None = None  # AdamW's for the input embeddings (None: --lr)
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    optimizer: str = "muon"  # muon (torch.optim.Muon for the blocks' matrices, AdamW for the rest) | adamw
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_precision: str = "auto"  # Newton–Schulz in fp32 | bf16 | auto: fp32 on a CPU (1.7x faster there), bf16 elsewhere (torch's)
    schedule: str = "wsd"  # wsd (warmup, stable, linear decay over the last `cooldown` of the budget) | cosine
    cooldown: float = 0.4
    model_options: dict = field(default_factory=dict)  # ModelConfig fields over the preset's (--model-option KEY=VALUE)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    budget: str = "5m"  # 5m, 300s, 1h, 2000steps, 2000, 5Mtokens; several joined by commas
    # passes over the training windows at most; None: TIME_BUDGET_EPOCHS for a budget of time alone (a step or token count
    # is exact), 0: no limit. Past a few epochs the model memorizes (30 minutes of the default are 13 epochs: 2.089 bits
    # per byte on the held-out plays against 1.925 for 10 minutes, 4.4 epochs; benchmarks/RESULTS.md)
    max_epochs: float | None = None
    eval_every: int = 200
    eval_windows: int = 64  # per evaluation during the run, spread evenly over the validation shard
    final_eval_tokens: int = 2**20  # the final evaluation scores the whole validation shard up to this many tokens
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    log_every: int = 10
    save_every: int | None = None  # checkpoint every N steps (default: at each evaluation)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool | None = None  # None: on for a single-process decoder on a CPU (it pays: 1.3x), unless LLMKIT_COMPILE=0
    seed: int = 1337
    out: str = "runs/pretrain"
    resume: bool = False
    peak_flops: float | None = None
    fsdp: bool = False
    samples: bool = True


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
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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


def _all_reduce_sum(values: list[float], d: Dist, op: str = "sum") -> list[float]:
    """Sum (or max) of each value over the ranks; every rank gets the result."""
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _all_gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- data --------------------------------------------------------------------------------------------------


def _sentinels(cfg: PretrainConfig) -> int:
    """T5's sentinel tokens <extra_id_N> for span corruption; decoders and encoders never see them (100 rows of the
    default 1,280-token head would be dead weight)."""
    from llmkit.tokenizer.core import N_SENTINELS

    return N_SENTINELS if cfg.family == "encoder-decoder" else 0


def prepare_data(cfg: PretrainConfig, d: Dist, log) -> Path:
    """A prepared shard folder: `cfg.data` itself, or a source prepared into OUT/data with a new tokenizer.

    The corpus is split once: the tokenizer learns from exactly the training documents the shards hold. OUT/data
    records what it was prepared from; a folder left by another source, vocabulary or tokenizer kind (say a run that
    died before its first checkpoint) is prepared again rather than reused."""
    from llmkit.data.loader import load_meta

    if (Path(cfg.data) / "meta.json").exists():
        return Path(cfg.data)
    data_dir = Path(cfg.out) / "data"
    val_fraction = 0.1
    byte_fallback = cfg.tokenizer_kind == "unigram"  # every held-out character costs bits (none is an unknown token)
    sentinels = _sentinels(cfg)
    recipe = {
        "data": cfg.data,
        "tokenizer_kind": cfg.tokenizer_kind,
        "byte_fallback": byte_fallback,
        "sentinels": sentinels,
        "vocab_size": cfg.vocab_size,
        "seed": cfg.seed,
        "val_fraction": val_fraction,
    }
    if d.main:
        meta = io.read_json(data_dir / "meta.json") if (data_dir / "meta.json").exists() else None
        if meta is not None and not cfg.resume:  # the same options and the same text, or it is prepared again
            from llmkit.data.prepare import source_fingerprint

            recipe["source_sha256"] = source_fingerprint(cfg.data)
        stale = (
            meta is not None and not cfg.resume and {**meta.get("prepared_for", {}), "source_sha256": meta.get("source_sha256")} != recipe
        )
        if stale and meta is not None:  # a resumed run keeps its own data: its checkpoint's tokenizer fingerprint is checked
            log(f"{data_dir} was prepared from other options ({meta.get('prepared_for')}); preparing it again")
            (data_dir / "meta.json").unlink()
            meta = None
        if meta is None:
            from llmkit.data.prepare import split_corpus, write_shards
            from llmkit.tokenizer import SpecialTokens, train_tokenizer

            log(f"preparing {cfg.data}: training a {cfg.tokenizer_kind} tokenizer ({cfg.vocab_size} tokens) on its training split")
            split = split_corpus(cfg.data, val_fraction=val_fraction, seed=cfg.seed, log=log)
            tok = train_tokenizer(
                split.train,
                cfg.tokenizer_kind,
                cfg.vocab_size,
                byte_fallback=byte_fallback,
                special=SpecialTokens(sentinels=sentinels),
            )
            write_shards(split, tok, data_dir, source=cfg.data, extra={"prepared_for": recipe})
    _barrier(d)
    load_meta(data_dir)
    return data_dir


# --- the model and its loss ----------------------------------------------------------------------------------


def build(cfg: PretrainConfig, vocab_size: int):
    from llmkit.model import build_model, preset
    from llmkit.model.config import PRESETS

    name = cfg.preset or DEFAULT_PRESETS[cfg.family]
    overrides = {**cfg.model_options, **{k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads") if getattr(cfg, k) is not None}}
    base = PRESETS.get(name, {})
    if base.get("d_ff") and base.get("d_model") and "d_model" in overrides and "d_ff" not in overrides:  # keep the MLP's ratio
        overrides["d_ff"] = max(1, round(base["d_ff"] * overrides["d_model"] / base["d_model"]))
    mcfg = preset(name, vocab_size=vocab_size, max_seq_len=cfg.block_size, dropout=cfg.dropout, **overrides)
    if mcfg.family != cfg.family:
        raise LlmkitError(f"preset {name!r} is a {mcfg.family}, not a {cfg.family}", f"use --family {mcfg.family} or another preset")
    if overrides.get("n_heads") and "d_model" not in overrides and mcfg.d_model % mcfg.n_heads:
        raise LlmkitError(f"d_model {mcfg.d_model} is not divisible by {mcfg.n_heads} heads", "choose --n-heads that divides --d-model")
    return build_model(mcfg)


@dataclass
class Prepared:
    """One micro-batch as the model takes it: inputs and targets (CPU tensors), and how many targets count."""

    inputs: torch.Tensor
    targets: torch.Tensor
    decoder_inputs: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.targets != objectives.IGNORE).sum())

    def rows(self, index) -> Prepared:
        return Prepared(self.inputs[index], self.targets[index], None if self.decoder_inputs is None else self.decoder_inputs[index])


class Objective:
    """Turns a (B, W) window batch into the family's inputs and targets, and a prepared batch into the summed loss over
    its targets. The random masks (MLM, span corruption) of each row are a pure function of a key per row, (seed, step,
    row of the global batch): so one process, N processes and gradient accumulation draw the very same masks."""

    def __init__(self, cfg: PretrainConfig, tok, rank: int):
        self.cfg, self.tok, self.rank = cfg, tok, rank
        self.window = cfg.block_size + 1 if cfg.family == "decoder" else cfg.block_size
        if cfg.family == "encoder" and tok.mask_id is None:
            raise LlmkitError(
                "masked-LM pretraining needs a <mask> token in the tokenizer", "train the tokenizer with its default special tokens"
            )
        if cfg.family == "encoder-decoder" and len(tok.sentinel_ids) < 20:
            raise LlmkitError(
                "span corruption needs sentinel tokens <extra_id_N> in the tokenizer", "train the tokenizer with --sentinels 100"
            )

    def prepare(self, batch: torch.Tensor, keys: list[tuple[int, ...]]) -> Prepared:
        """`keys`: one tuple of ints per row."""
        if self.cfg.family == "decoder":
            return Prepared(*objectives.causal_lm(batch))
        if self.cfg.family == "encoder":
            pairs = [
                objectives.masked_lm(
                    row[None],
                    mask_id=self.tok.mask_id,
                    vocab_size=self.tok.vocab_size,
                    special_ids=self.tok.special_ids,
                    generator=torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0])),
                )
                for row, key in zip(batch, keys)
            ]
            return Prepared(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
        pad = self.tok.pad_id or 0
        pairs = [
            objectives.span_corruption(
                row[None], sentinel_ids=self.tok.sentinel_ids, eos_id=self.tok.eos_id, pad_id=pad, rng=np.random.default_rng(list(key))
            )
            for row, key in zip(batch, keys)
        ]
        width = max(e.shape[1] for e, _ in pairs), max(y.shape[1] for _, y in pairs)
        enc = torch.cat([F.pad(e, (0, width[0] - e.shape[1]), value=pad) for e, _ in pairs])
        y = torch.cat([F.pad(t, (0, width[1] - t.shape[1]), value=objectives.IGNORE) for _, t in pairs])
        return Prepared(enc, y, objectives.shift_right(y, pad, pad))

    def loss_sum(self, model, p: Prepared, reduction: str = "sum") -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the targets, number of targets); `reduction="none"`: each position's (0 where
        the target is ignored)."""
        device = next(model.parameters()).device
        if p.decoder_inputs is not None:
            enc = p.inputs.to(device)
            logits = model(enc, p.decoder_inputs.to(device), attention_mask=(enc != (self.tok.pad_id or 0)).long())
        else:
            logits = model(p.inputs.to(device))
        y = p.targets.to(device)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=objectives.IGNORE, reduction=reduction
        )
        return loss, p.n_targets


def accumulate_gradients(
    train_model, micro: list, loss_sum_fn, counts: list[int], d: Dist, amp, scaler=None, sharded: bool = False
) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, weighting every target token alike: each micro-batch's
    summed loss (`loss_sum_fn(m)`, over `counts[i]` targets) is divided by the count of targets in the whole step, over
    every micro-batch of every rank (a micro-batch with 3 targets weighs 3/40 of one with 40, not as much, unlike a mean
    per micro-batch). DDP and FSDP average gradients over ranks, so the local loss is scaled by the world size.
    Returns (this rank's summed loss, the global target count). Pretraining and fine-tuning both step through here."""
    total = int(_all_reduce_sum([float(sum(counts))], d)[0])
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


class Optimizers:
    """Several optimizers stepped as one (Muon for the matrices, AdamW for the rest), with one state dict in the usual
    layout (parameters numbered across all of them in order), so checkpoints and GradScaler take it as one optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer | None):
        self.optimizers: list[torch.optim.Optimizer] = [o for o in optimizers if o is not None]
        # this run's peaks and weight decays: a resumed state does not override them
        self.base_lrs = [g["base_lr"] for g in self.param_groups]
        self.weight_decays = [g["weight_decay"] for g in self.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: st for o in self.optimizers for p, st in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({offset + i: st for i, st in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups):
            raise LlmkitError(
                f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's {len(self.param_groups)}",
                "resume with the same --optimizer (and --embedding-lr given or not) as the original run",
            )
        for o in self.optimizers:
            # torch maps a saved group's parameter keys (indices, or FSDP2's names) to its own by position
            mine, groups = groups[: len(o.param_groups)], groups[len(o.param_groups) :]
            keys = {k for g in mine for k in g["params"]}
            o.load_state_dict({"state": {k: st for k, st in sd["state"].items() if k in keys}, "param_groups": mine})
        for g, lr, wd in zip(self.param_groups, self.base_lrs, self.weight_decays):
            g["base_lr"], g["weight_decay"] = lr, wd


def _muon_base():
    if not hasattr(torch.optim, "Muon"):
        return torch.optim.Optimizer  # torch < 2.9: make_optimizer refuses --optimizer muon with a clear error
    return torch.optim.Muon


class Muon(_muon_base()):  # type: ignore[misc]
    """torch.optim.Muon (same state, same update), with the Newton–Schulz orthogonalization in `ns_dtype`. torch runs
    it in bfloat16, which pays on GPU tensor cores; on a CPU without AMX bfloat16 matrix products are slower than
    float32 ones: the default model's 24 matrices orthogonalize in 41 ms per step in float32 against 70 in bfloat16
    (2 cores, a fifth of the step). `ns_dtype=torch.bfloat16` is torch's own step, unchanged."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if getattr(self, "ns_dtype", torch.bfloat16) == torch.bfloat16:  # a copy (deepcopy, pickle) keeps torch's defaults only
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from torch.optim._muon import _adjust_lr

        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p) or p.grad.dim() != 2:
                    raise RuntimeError("Muon takes dense real 2-D matrices only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz iteration (torch.optim.Muon's), in `dtype`: about U Vᵀ of g = U S Vᵀ,
    computed on the wide orientation (X Xᵀ is the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):  # x <- a x + (b G + c G²) x, G = x xᵀ
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_parameters(model) -> list:
    """The matrices Muon trains: the weights of the hidden linear layers (the blocks' attention and feed-forward
    projections, and BERT's MLM transform and pooler). Embeddings, the LM head (tied or not), norms, biases and
    classifier heads stay with AdamW, as in modded-nanogpt."""
    from torch import nn

    head = getattr(model, "lm_head", None)
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in head.parameters()} if head is not None else set()
    classifier = getattr(model, "classifier", None)
    skip |= {id(p) for p in classifier.parameters()} if classifier is not None else set()
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in skip and m.weight.dim() == 2
    ]


def _embedding_parameters(model) -> set[int]:
    """ids of the input embedding tables (tokens, learned positions, token types: the matrices of each family's
    embedding layer, not its norm nor T5's relative-position biases), less the LM head's when it is tied to them."""
    from llmkit.model.families import Embedding

    head = getattr(model, "lm_head", None)
    shared = {id(p) for p in head.parameters()} if head is not None else set()
    tables = {id(p) for m in model.modules() if isinstance(m, Embedding) for p in m.parameters() if p.dim() >= 2}
    if not tables - shared:
        raise LlmkitError(
            "--embedding-lr has no input embedding of its own to train: the model's embeddings are its (tied) LM head",
            "leave --embedding-lr out (--lr trains the tied matrix), or untie it: --model-option tie_embeddings=false",
        )
    return tables - shared


def make_optimizer(model, cfg: PretrainConfig, device: torch.device) -> Optimizers:
    """`--optimizer muon`: torch.optim.Muon (momentum, Newton–Schulz orthogonalized updates) for the blocks' matrices and
    AdamW for the rest; `--optimizer adamw`: AdamW for everything. AdamW decays matrices only (not biases, norms or
    1-D tensors) and is fused on CUDA. Each group keeps its peak lr as `base_lr` (the schedule scales it)."""
    if cfg.optimizer not in ("muon", "adamw"):
        raise LlmkitError(f"unknown optimizer {cfg.optimizer!r}", "use muon or adamw")
    if cfg.schedule not in ("wsd", "cosine") or not 0 < cfg.cooldown <= 1:
        raise LlmkitError(
            f"schedule {cfg.schedule!r} with cooldown {cfg.cooldown} is not valid", "use wsd or cosine, and a cooldown in (0, 1]"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    muon_params = muon_parameters(model) if cfg.optimizer == "muon" else []
    precision = cfg.muon_precision if cfg.muon_precision != "auto" else ("fp32" if device.type == "cpu" else "bf16")
    if precision not in ("fp32", "bf16"):
        raise LlmkitError(f"unknown Muon precision {cfg.muon_precision!r}", "use auto, fp32 or bf16")
    if muon_params and not hasattr(torch.optim, "Muon"):
        raise LlmkitError(f"torch {torch.__version__} has no torch.optim.Muon", "upgrade torch (2.9 or later), or use --optimizer adamw")
    in_muon = {id(p) for p in muon_params}
    rest = [p for p in params if id(p) not in in_muon]
    embeddings = _embedding_parameters(model) if cfg.embedding_lr is not None else set()
    decay = [p for p in rest if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
            {"params": [p for p in rest if id(p) in embeddings], "weight_decay": cfg.weight_decay, "base_lr": cfg.embedding_lr},
        )
        if g["params"]
    ]
    adamw = torch.optim.AdamW(
        [{**g, "lr": g["base_lr"]} for g in groups], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )
    muon = None
    if muon_params:
        # "original" adjusts the lr by sqrt(max(1, rows / columns)), as Keller Jordan's Muon; decoupled weight decay
        # p <- p (1 - lr * wd), scaled by the schedule as the update
        muon = Muon(
            [{"params": muon_params, "base_lr": cfg.muon_lr}],
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_weight_decay,
            nesterov=True,
            ns_dtype=torch.float32 if precision == "fp32" else torch.bfloat16,
        )
    return Optimizers(muon, adamw)


# --- evaluation ---------------------------------------------------------------------------------------------


def eval_starts(n_tokens: int, window: int, n: int) -> list[int]:
    """Start offsets of `n` windows of `window` tokens spread evenly over a shard of `n_tokens` tokens, each the middle
    one of its share (every window when the shard holds `n` or fewer): a sample of every held-out document, not the
    opening of the first one (the first 64 windows of Shakespeare's held-out plays read 0.05-0.09 bits per byte above
    the whole plays)."""
    available = n_tokens // window
    n = min(n, available)
    return [(2 * i + 1) * available // (2 * n) * window for i in range(n)]


@torch.no_grad()
def evaluate(model, objective: Objective, cfg: PretrainConfig, data_dir: Path, d: Dist, amp, final: bool = False) -> dict:
    """Validation loss, perplexity and bits per byte on `eval_windows` windows of val.bin spread evenly over it
    (`eval_starts`), split by rank; `final`: on the whole of it, up to `final_eval_tokens` tokens.

    Every rank makes the same number of forward calls (a rank short of windows runs a dummy one, not counted): under
    FSDP each forward all-gathers the weights, and a rank that skipped one would leave the others waiting forever. A
    validation shard shorter than one window is scored as one shorter window."""
    from llmkit.data.loader import open_shard
    from llmkit.evaluate.perplexity import summarize

    model.eval()
    val = open_shard(data_dir, "val")
    window = min(objective.window, len(val))
    starts = eval_starts(len(val), window, max(1, cfg.final_eval_tokens // window) if final else cfg.eval_windows)
    n_win, mine = len(starts), starts[d.rank :: d.world]
    n_batches = math.ceil(math.ceil(n_win / d.world) / cfg.batch_size)
    token_bytes = torch.tensor(objective.tok.token_bytes + [0] * max(0, model.config.vocab_size - len(objective.tok.token_bytes)))
    nats, count, byte_nats, n_bytes = 0.0, 0.0, 0.0, 0.0
    for b in range(n_batches):
        starts = mine[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        rows = torch.from_numpy(np.stack([val[s : s + window] for s in (starts or [0])]).astype(np.int64))
        batch = objective.prepare(rows, [(cfg.seed, 10**9, s) for s in (starts or [0])])  # fixed draws
        with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses, n = objective.loss_sum(model, batch, reduction="none")
        if starts:
            targets = batch.targets.reshape(-1)
            weights = token_bytes[targets.clamp(min=0)] * (targets != objectives.IGNORE)  # the bytes each target stands for
            nats += losses.sum().item()
            count += n
            # bits per byte over the targets that stand for text (as nanochat): an eos, a sentinel has no bytes
            byte_nats += losses.cpu()[weights > 0].sum().item()
            n_bytes += float(weights.sum())
    nats, count, byte_nats, n_bytes = _all_reduce_sum([nats, float(count), byte_nats, n_bytes], d)
    model.train()
    out = summarize(nats, int(count), n_bytes)
    bpb = byte_nats / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"loss": out["nats_per_token"], "ppl": out["perplexity"], "bpb": bpb, "windows": n_win}


def sample_text(model, tok, data_dir: Path, cfg: PretrainConfig, n_tokens: int = 120) -> str:
    from llmkit.data.loader import open_shard
    from llmkit.generate import GenerationConfig, generate

    prompt = [int(i) for i in open_shard(data_dir, "val")[: min(16, model.config.max_seq_len // 4)]]
    n_tokens = min(n_tokens, model.config.max_seq_len - len(prompt))
    model.eval()
    out = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=cfg.seed))[0]
    model.train()
    return tok.decode(prompt + out.ids)  # decoded together: a unigram's decoder drops the space before a first piece


# --- metrics ---------------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl (one JSON object per logged step) and the loss-curve PNG."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        self.rows: list[dict] = []
        if enabled and resume_step is not None and self.path.exists():  # drop what a killed run logged after its checkpoint
            rows = map(json.loads, self.path.read_text().splitlines())
            self.rows = [r for r in rows if r["step"] <= resume_step and not r.get("final")]  # a finished run's last score goes too
            io.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        elif enabled:
            io.write_text(self.path, "")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

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


# --- the recipe ---------------------------------------------------------------------------------------------------


class _Crash(Exception):
    """Raised by the `crash_after_step` test hook to stop a run as a kill would (no final save)."""


def pretrain(cfg: PretrainConfig, *, log=print, crash_after_step: int | None = None) -> dict:
    """Run the recipe; returns the summary written to report.md."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from llmkit.data.loader import SAMPLINGS, WindowLoader, check_tokenizer, load_meta
    from llmkit.model import ModelConfig
    from llmkit.model.weights import _aliases, load_state, save_model
    from llmkit.progress import progress
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.checkpoint import load_checkpoint, rank_keys, resume_point, rng_states, save_checkpoint, set_rng_states

    # ---------------------------------------------------------------- setup
    if cfg.family not in DEFAULT_PRESETS:
        raise LlmkitError(f"unknown family {cfg.family!r}", "use decoder, encoder or encoder-decoder")
    if cfg.sampling not in SAMPLINGS:  # before the data is prepared; the loader checks again for its other callers
        raise LlmkitError(f"unknown sampling {cfg.sampling!r}", f"use {' or '.join(SAMPLINGS)}")
    if cfg.embedding_lr is not None and not cfg.embedding_lr > 0 or cfg.muon_weight_decay < 0:
        raise LlmkitError(
            f"--embedding-lr {cfg.embedding_lr} / --muon-weight-decay {cfg.muon_weight_decay} is out of range",
            "use a learning rate above 0 and a weight decay of 0 or more",
        )
    if cfg.max_epochs is not None and not 0 <= cfg.max_epochs < math.inf or cfg.final_eval_tokens < 1:
        raise LlmkitError(
            f"--max-epochs {cfg.max_epochs} / --final-eval-tokens {cfg.final_eval_tokens} is out of range",
            "use a finite number of epochs, 0 or more (0: no limit), and 1 or more tokens",
        )
    budget = Budget.parse(cfg.budget)
    d = init_distributed()
    say = log if d.main else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    ckpt_path = resume_point(run_dir, cfg.resume)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data_dir = prepare_data(cfg, d, say)
    meta = load_meta(data_dir)
    if cfg.eval_windows < 1:
        raise LlmkitError(f"--eval-windows {cfg.eval_windows} scores nothing", "use 1 or more (default: 64)")
    if meta["val_tokens"] < 2:
        raise LlmkitError(
            f"the validation shard of {data_dir} has {meta['val_tokens']} tokens: nothing to evaluate on",
            "prepare the data with a validation split (--val-fraction 0.1) or more text",
        )
    tok = Tokenizer.load(data_dir)
    check_tokenizer(meta, tok)
    model = build(cfg, tok.vocab_size).to(d.device)
    mcfg = model.config
    torch.manual_seed(cfg.seed + 1_000_003 * d.rank)  # dropout: each rank its own masks
    if d.device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed + 1_000_003 * d.rank)
    objective = Objective(cfg, tok, d.rank)
    loader = WindowLoader(
        data_dir,
        "train",
        window=objective.window,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=d.rank,
        world_size=d.world,
        sampling=cfg.sampling,
        stride=cfg.block_size,  # a decoder's windows (block + 1 tokens) overlap by one: every token is a target once per epoch
    )
    global_batch = cfg.batch_size * d.world * cfg.grad_accum  # rows per optimizer step, all ranks and micro-steps
    budget.limit_epochs(cfg.max_epochs, loader.windows_per_epoch() * cfg.block_size)  # tokens_seen's unit: rows x block size
    step, tokens_seen, elapsed_before, best_val, bad_evals, warm_progress = 0, 0, 0.0, float("inf"), 0, None
    opt_state = scaler_state = None
    if ckpt_path is not None:
        model_state, opt_state, state = load_checkpoint(ckpt_path)
        if ModelConfig.from_dict(state["model_config"]).to_dict() != mcfg.to_dict() or state["tokenizer"] != tok.fingerprint():
            raise LlmkitError(
                f"the checkpoint in {ckpt_path} belongs to another model or tokenizer than this command builds",
                "resume with the same options as the original run (its train_config.json lists them)",
            )
        load_state(model, model_state, source=str(ckpt_path))  # full weights, before any sharding
        set_rng_states(state["rng"], d.rank, fallback_seed=cfg.seed + 1_000_003 * d.rank + state["step"], log=log)
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        best_val, bad_evals = state["best_val"], state["bad_evals"]
        # a checkpoint from before warm_progress was saved: its cosine ran from the start of the budget
        warm_progress = state.get("warm_progress", 0.0 if step > cfg.warmup else None)
        scaler_state = state.get("grad_scaler")
        say(f"resumed from {ckpt_path} at step {step}")
        if "epoch_limit" not in state and budget.epoch_limit:  # a run from before the limit, resumed with the same flags
            say(
                f"[yellow]warning:[/] the run started without an epoch limit and now stops after {budget.epochs:g} epochs "
                f"({budget.epoch_limit:,} tokens; it has seen {tokens_seen:,}): resume with --max-epochs 0 to go on without"
            )
        before = state.get("sampling", "random")
        if before != cfg.sampling:  # a run from before the shuffled default, resumed with the default flags
            say(f"[yellow]warning:[/] the run drew its windows with --sampling {before}; it goes on with {cfg.sampling}")
        elif cfg.sampling == "shuffle" and state.get("global_batch", global_batch) != global_batch:
            say(
                f"[yellow]warning:[/] the global batch was {state['global_batch']} rows and is now {global_batch}: this epoch's "
                f"window order goes on from row {step} × {global_batch}, so some of its windows are skipped or seen twice"
            )
    amp = autocast_dtype(cfg.precision, d.device, measure=d.world == 1)  # measured for one process; ranks must agree
    if cfg.precision == "auto" and ckpt_path is not None and state.get("autocast") is not None:  # a resumed run keeps its choice
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[state["autocast"]]
    train_model = model
    sharded = d.world > 1 and cfg.fsdp
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []) or []:
            fully_shard(block)
        train_model = fully_shard(model)
    elif d.world > 1:
        train_model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg, d.device)  # after sharding: FSDP2 replaces the parameters
    if opt_state is not None:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(train_model, optimizer.optimizers, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state)
    # float16 needs loss scaling (small gradients underflow to zero), as nanoGPT does; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    compiled = cfg.compile
    if compiled is None:  # measured on 2 cores: the 5-minute default trains 1.3x faster compiled, the compile included
        compiled = d.device.type == "cpu" and d.world == 1 and cfg.family == "decoder" and os.environ.get("LLMKIT_COMPILE", "1") != "0"
    if compiled:
        train_model = torch.compile(train_model)
    flops = mcfg.flops_per_token(cfg.block_size)["train"]
    peak, peak_source = (cfg.peak_flops, "given") if cfg.peak_flops else peak_flops(d.device, amp)
    tokens_per_step = global_batch * cfg.block_size
    metrics = Metrics(run_dir, d.main, step if ckpt_path is not None else None)
    muon_ns = next((str(o.ns_dtype).removeprefix("torch.") for o in optimizer.optimizers if isinstance(o, Muon)), None)  # as resolved
    if d.main:
        io.write_json(
            run_dir / "train_config.json",
            {
                **dataclasses.asdict(cfg),
                "data_dir": str(data_dir),
                "world_size": d.world,
                "peak_flops_per_process": peak,
                "peak_flops_source": peak_source,
                "muon_newton_schulz": muon_ns,
            },
        )
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"{mcfg.family} {cfg.preset or DEFAULT_PRESETS[cfg.family]}: {n_params:,} parameters, vocab {tok.vocab_size}, "
        f"context {cfg.block_size}, {tokens_per_step:,} tokens/step, {d.world} process(es) on {d.device.type}, "
        f"precision {amp or 'fp32'}{' with loss scaling' if scaler.is_enabled() else ''}"
        f"{f', at most {budget.epochs:g} epochs of {budget.epoch_tokens:,} tokens' if budget.epoch_limit else ''}"
        f"{f', Muon orthogonalizing in {muon_ns}' if muon_ns else ''}; peak {peak / 1e9:.0f} GFLOP/s per process "
        f"({peak_source})"
    )

    def full_state():
        """(model state, optimizer state), gathered whole on every rank when the model is sharded."""
        if not sharded:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(train_model, options=opts), get_optimizer_state_dict(train_model, optimizer.optimizers, options=opts)

    def checkpoint():
        model_state, opt_state = full_state()
        rngs = _all_gather(rng_states(), d)  # every rank's generators, so dropout resumes exactly on each
        if d.main:
            aliases = _aliases(model)
            save_checkpoint(
                run_dir,
                model_state={k: v for k, v in model_state.items() if k not in aliases},
                optimizer_state=opt_state,
                state={
                    "step": step,
                    "tokens": tokens_seen,
                    "elapsed": elapsed,
                    "best_val": best_val,
                    "bad_evals": bad_evals,
                    "warm_progress": warm_progress,
                    "model_config": mcfg.to_dict(),
                    "tokenizer": tok.fingerprint(),
                    "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "world_size": d.world,
                    "sampling": cfg.sampling,
                    "global_batch": global_batch,
                    "epoch_limit": budget.epoch_limit,
                    "autocast": {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp],
                },
                rng={k: v for r, states in enumerate(rngs) for k, v in rank_keys(states, r).items()},
            )
        _barrier(d)

    # ---------------------------------------------------------------- train
    train_model.train()
    start = time.perf_counter()
    tokens_at_start = tokens_seen
    elapsed, stop_reason, last_val, nonfinite = elapsed_before, None, None, 0.0
    window_start, window_tokens = time.perf_counter(), 0
    total = budget.steps or budget.tokens or budget.seconds or 1
    with progress("steps" if budget.steps else ("tokens" if budget.tokens else "s"), disable=None if d.main else True) as bar:
        task = bar.add_task("pretrain", total=total)
        while True:
            elapsed = elapsed_before + time.perf_counter() - start
            stop_reason = budget.exhausted(step, tokens_seen, elapsed)
            if d.world > 1:  # one decision and one clock for all ranks: the slowest clock, and any rank's stop stops all
                elapsed, stopping, diverged = _all_reduce_sum([elapsed, 1.0 if stop_reason else 0.0, nonfinite], d, op="max")
                if diverged:
                    raise LlmkitError(
                        f"the loss became infinite or NaN at step {step - 1} on a rank", "lower --lr, or use --precision fp32"
                    )
                stop_reason = (
                    stop_reason or budget.exhausted(step, tokens_seen, elapsed) or ("budget reached on another rank" if stopping else None)
                )
            if stop_reason:
                break
            progress_now = budget.progress(step, tokens_seen, elapsed)
            if step >= cfg.warmup and warm_progress is None:  # where the cosine starts: the budget used when warmup ended
                exact = not (budget.tokens or budget.seconds or budget.epoch_limit)
                warm_progress = cfg.warmup / budget.steps if budget.steps and exact else progress_now
            scale = lr_scale(cfg, step, progress_now, warm_progress or 0.0)
            lr = cfg.lr * scale
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            micro = []
            for m in range(cfg.grad_accum):
                rows, index = loader.rows(step, m, cfg.grad_accum)
                micro.append(objective.prepare(rows, [(cfg.seed, step, i) for i in index]))
            loss_local, n_targets = accumulate_gradients(
                train_model, micro, lambda p: objective.loss_sum(train_model, p)[0], [p.n_targets for p in micro], d, amp, scaler, sharded
            )
            if not math.isfinite(loss_local):
                if d.world == 1:
                    raise LlmkitError(f"the loss became {loss_local} at step {step}", "lower --lr, or use --precision fp32")
                nonfinite = 1.0  # every rank hears of it at the next step's all-reduce and stops together
            if cfg.grad_clip:
                for opt in optimizer.optimizers:  # GradScaler takes each optimizer on its own (Muon and AdamW)
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
            for opt in optimizer.optimizers:
                scaler.step(opt)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = elapsed_before + time.perf_counter() - start
            if step % cfg.log_every == 0 or step == 1:
                loss_mean = _all_reduce_sum([loss_local], d)[0] / max(n_targets, 1)  # over every target token of the step
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)  # all processes' tokens
                window_start, window_tokens = now, 0
                mfu = flops * tps / (peak * d.world)  # against every process's peak, not one
                row = {
                    "step": step,
                    "split": "train",
                    "loss": loss_mean,
                    "lr": lr,
                    "tokens": tokens_seen,
                    "tokens_per_s": tps,
                    "mfu": mfu,
                    "elapsed": round(elapsed, 2),
                }
                if scaler.is_enabled():
                    row["loss_scale"] = scaler.get_scale()
                metrics.log(row)
                bar.update(task, description=f"loss {loss_mean:.3f} | {tps:,.0f} tok/s | MFU {mfu:.1%}")
            bar.update(task, completed=step if budget.steps else (tokens_seen if budget.tokens else elapsed))
            evaluating = step % cfg.eval_every == 0
            if evaluating:
                last_val = evaluate(model, objective, cfg, data_dir, d, amp)
                metrics.log({"step": step, "split": "val", **last_val, "tokens": tokens_seen, "elapsed": round(elapsed, 2)})
                if cfg.family == "decoder" and cfg.samples and d.main and not sharded:
                    text = sample_text(model, tok, data_dir, cfg)
                    metrics.log({"step": step, "split": "sample", "text": text})
                    _append_sample(run_dir, step, text)
                say(f"step {step}: val loss {last_val['loss']:.4f}, ppl {last_val['ppl']:.2f}, {last_val['bpb']:.4f} bits/byte")
                if last_val["loss"] < best_val - 1e-4:
                    best_val, bad_evals = last_val["loss"], 0
                else:
                    bad_evals += 1
                metrics.plot(run_dir / "loss.png")
            if evaluating and cfg.save_every is None or cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
            if crash_after_step is not None and step >= crash_after_step:
                raise _Crash(step)
            if cfg.patience and bad_evals >= cfg.patience:
                stop_reason = f"validation loss plateau ({cfg.patience} evaluations without improvement)"
                break
        bar.update(task, completed=total)  # the run is over, whichever limit ended it

    # ---------------------------------------------------------------- cleanup
    # the final model on the whole validation shard (up to --final-eval-tokens): 5 s on 2 cores for Shakespeare's
    final_val = evaluate(model, objective, cfg, data_dir, d, amp, final=True)
    metrics.log({"step": step, "split": "val", "final": True, **final_val, "tokens": tokens_seen, "elapsed": round(elapsed, 2)})
    checkpoint()
    final_state = full_state()[0]
    train_rows = [r for r in metrics.rows if r.get("split") == "train"]
    summary = {
        "stop_reason": stop_reason,
        "steps": step,
        "tokens": tokens_seen,
        "seconds": round(elapsed, 1),
        # this session's rate: the tokens since it started (or resumed) over the time since then
        "session_tokens": tokens_seen - tokens_at_start,
        "session_seconds": elapsed - elapsed_before,
        "tokens_per_s": (tokens_seen - tokens_at_start) / max(elapsed - elapsed_before, 1e-9) if step else 0.0,
        "mfu": (sum(r["mfu"] for r in train_rows[-20:]) / len(train_rows[-20:])) if train_rows else 0.0,
        "val_loss": final_val["loss"],
        "val_ppl": final_val["ppl"],
        "val_bpb": final_val["bpb"],
        "val_windows": final_val["windows"],
        "parameters": n_params,
        "family": cfg.family,
        "preset": cfg.preset or DEFAULT_PRESETS[cfg.family],
        "world_size": d.world,
    }
    if d.main:
        save_model(model, run_dir, tokenizer=tok, state=final_state)
        if cfg.family == "decoder" and cfg.samples and not sharded:
            summary["sample"] = sample_text(model, tok, data_dir, cfg)
        metrics.plot(run_dir / "loss.png")
        _write_report(run_dir, summary)
        say(
            f"stopped: {stop_reason}. {step} steps, {tokens_seen:,} tokens in {elapsed:.0f}s; "
            f"val loss {final_val['loss']:.4f}, ppl {final_val['ppl']:.2f}, {final_val['bpb']:.4f} bits/byte -> {run_dir}"
        )
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def _append_sample(run_dir: Path, step: int, text: str) -> None:
    with open(run_dir / "samples.md", "a", encoding="utf-8") as f:
        f.write(f"## step {step}\n\n```\n{text}\n```\n\n")


def _write_report(run_dir: Path, s: dict) -> None:
    lines = [
        "# pretraining run",
        "",
        f"- family: {s['family']} ({s['preset']}), {s['parameters']:,} parameters",
        f"- stopped: {s['stop_reason']}",
        f"- {s['steps']} steps, {s['tokens']:,} tokens, {s['seconds']} s, {s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}",
        f"- validation ({s['val_windows']} windows): loss {s['val_loss']:.4f} nats/token, perplexity {s['val_ppl']:.2f}, "
        f"{s['val_bpb']:.4f} bits per byte",
        "",
        "![loss](loss.png)",
        "",
    ]
    if s.get("sample"):
        lines += ["## sample", "", "```", s["sample"], "```", ""]
    io.write_text(run_dir / "report.md", "\n".join(lines))
