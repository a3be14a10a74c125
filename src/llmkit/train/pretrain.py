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

DEFAULT_PRESETS = {"decoder": "cpu-gpt", "encoder": "tiny-bert", "encoder-decoder": "tiny-t5"}


@dataclass
class PretrainConfig:
    family: str = "decoder"
    preset: str | None = None  # default: cpu-gpt / tiny-bert / tiny-t5
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    data: str = "shakespeare"  # a prepared shard folder, or a source to prepare (shakespeare, files, globs)
    tokenizer_kind: str = "byte-bpe"  # for data prepared here
    vocab_size: int = 2048
    block_size: int = 128
    batch_size: int = 32  # per process and micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    budget: str = "5m"  # 5m, 300s, 1h, 2000steps, 2000, 5Mtokens; several joined by commas
    eval_every: int = 200
    eval_windows: int = 64
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    log_every: int = 10
    save_every: int | None = None  # checkpoint every N steps (default: at each evaluation)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 1337
    out: str = "runs/pretrain"
    resume: bool = False
    peak_flops: float | None = None
    fsdp: bool = False
    samples: bool = True


# --- budget and schedule --------------------------------------------------------------------------------


@dataclass
class Budget:
    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, spec: str) -> "Budget":
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
        parts = [step / self.steps if self.steps else 0, tokens / self.tokens if self.tokens else 0,
                 seconds / self.seconds if self.seconds else 0]
        return min(1.0, max(parts))

    def exhausted(self, step, tokens, seconds) -> str | None:
        if self.steps and step >= self.steps:
            return f"budget of {self.steps} steps reached"
        if self.tokens and tokens >= self.tokens:
            return f"budget of {self.tokens:,} tokens reached"
        if self.seconds and seconds >= self.seconds:
            return f"time budget of {self.seconds:.0f}s reached"
        return None


def learning_rate(cfg: PretrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * lr as the budget is used."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# --- hardware --------------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for `precision` on `device`, or None for float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None  # measured: bf16 autocast ~2x fp32 training on AVX512-BF16


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype) -> tuple[float, str]:
    """Dense peak FLOP/s: a datasheet figure for known GPUs, else a measured matmul rate on this machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} datasheet (bf16 dense)"
    n = 1024
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype or torch.float32)  # leaves the global RNG alone
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


def _all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- data --------------------------------------------------------------------------------------------------


def prepare_data(cfg: PretrainConfig, d: Dist, log) -> Path:
    """A prepared shard folder: `cfg.data` itself, or a source prepared into OUT/data with a new tokenizer."""
    from llmkit.data.loader import load_meta

    if (Path(cfg.data) / "meta.json").exists():
        return Path(cfg.data)
    data_dir = Path(cfg.out) / "data"
    if d.main and not (data_dir / "meta.json").exists():
        from llmkit.data.clean import normalize
        from llmkit.data.prepare import prepare
        from llmkit.data.sources import read_source
        from llmkit.data.split import split_documents
        from llmkit.tokenizer import train_tokenizer

        log(f"preparing {cfg.data}: training a {cfg.tokenizer_kind} tokenizer ({cfg.vocab_size} tokens) on its training split")
        texts = [normalize(t) for t in read_source(cfg.data).texts]
        train_texts, _ = split_documents(texts, 0.1, cfg.seed)
        tok = train_tokenizer(train_texts, cfg.tokenizer_kind, cfg.vocab_size)
        prepare(cfg.data, tok, str(data_dir), seed=cfg.seed, log=log)
    _barrier(d)
    load_meta(data_dir)
    return data_dir


# --- the model and its loss ----------------------------------------------------------------------------------


def build(cfg: PretrainConfig, vocab_size: int):
    from llmkit.model import build_model, preset

    name = cfg.preset or DEFAULT_PRESETS[cfg.family]
    overrides = {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads") if getattr(cfg, k) is not None}
    mcfg = preset(name, vocab_size=vocab_size, max_seq_len=cfg.block_size, dropout=cfg.dropout, **overrides)
    if mcfg.family != cfg.family:
        raise LlmkitError(f"preset {name!r} is a {mcfg.family}, not a {cfg.family}", f"use --family {mcfg.family} or another preset")
    if overrides.get("n_heads") and "d_model" not in overrides and mcfg.d_model % mcfg.n_heads:
        raise LlmkitError(f"d_model {mcfg.d_model} is not divisible by {mcfg.n_heads} heads", "choose --n-heads that divides --d-model")
    return build_model(mcfg)


class Objective:
    """Turns a (B, W) window batch into the family's loss; deterministic in (seed, step, micro-step, rank)."""

    def __init__(self, cfg: PretrainConfig, tok, rank: int):
        self.cfg, self.tok, self.rank = cfg, tok, rank
        self.window = cfg.block_size + 1 if cfg.family == "decoder" else cfg.block_size
        if cfg.family == "encoder" and tok.mask_id is None:
            raise LlmkitError("masked-LM pretraining needs a <mask> token in the tokenizer", "train the tokenizer with its default special tokens")
        if cfg.family == "encoder-decoder" and len(tok.sentinel_ids) < 20:
            raise LlmkitError("span corruption needs sentinel tokens <extra_id_N> in the tokenizer", "train the tokenizer with --sentinels 100")

    def loss(self, model, batch: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """(mean loss, tokens scored)."""
        device = next(model.parameters()).device
        if self.cfg.family == "decoder":
            x, y = objectives.causal_lm(batch)
            logits = model(x.to(device))
        elif self.cfg.family == "encoder":
            g = torch.Generator().manual_seed(hash(key) % (2**63))
            x, y = objectives.masked_lm(batch, mask_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
                                        special_ids=self.tok.special_ids, generator=g)
            logits = model(x.to(device))
        else:
            rng = np.random.default_rng(list(key))
            enc, y = objectives.span_corruption(batch, sentinel_ids=self.tok.sentinel_ids, eos_id=self.tok.eos_id,
                                                pad_id=self.tok.pad_id or 0, rng=rng)
            dec = objectives.shift_right(y, self.tok.pad_id or 0, self.tok.pad_id or 0)
            enc = enc.to(device)
            logits = model(enc, dec.to(device), attention_mask=(enc != (self.tok.pad_id or 0)).long())
        y = y.to(device)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=objectives.IGNORE)
        return loss, int((y != objectives.IGNORE).sum())


def make_optimizer(model, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or 1-D tensors); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


# --- evaluation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, objective: Objective, cfg: PretrainConfig, data_dir: Path, meta: dict, d: Dist, amp) -> dict:
    """Validation loss, perplexity and bits per byte on the first eval_windows windows of val.bin (split by rank)."""
    from llmkit.data.loader import WindowLoader
    from llmkit.evaluate.perplexity import score_tokens, summarize

    model.eval()
    if cfg.family == "decoder":
        from llmkit.data.loader import open_shard

        ids = np.asarray(open_shard(data_dir, "val")[: cfg.eval_windows * objective.window]).astype(np.int64)
        # each rank scores its share of the windows; the sums are combined
        n_win = len(ids) // objective.window
        mine = np.concatenate([ids[i * objective.window:(i + 1) * objective.window] for i in range(d.rank, n_win, d.world)] or [ids[:0]])
        nats, count = score_tokens(model, mine, objective.window, batch_size=cfg.batch_size, autocast_dtype=amp) if len(mine) else (0.0, 0)
    else:
        loader = WindowLoader(data_dir, "val", window=objective.window, batch_size=cfg.batch_size, rank=d.rank, world_size=d.world)
        nats, count = 0.0, 0
        for i, batch in enumerate(loader.sequential(max_windows=cfg.eval_windows)):
            with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, n = objective.loss(model, batch, (cfg.seed, 10**9, i, d.rank))  # a fixed draw for every evaluation
            nats += loss.item() * n
            count += n
    nats, count = _all_reduce_sum([nats, float(count)], d)
    model.train()
    bytes_per_token = meta["val_bytes"] / max(meta["val_tokens"], 1)
    out = summarize(nats, int(count), count * bytes_per_token)
    return {"loss": out["nats_per_token"], "ppl": out["perplexity"], "bpb": out["bits_per_byte"]}


def sample_text(model, tok, data_dir: Path, cfg: PretrainConfig, n_tokens: int = 120) -> str:
    from llmkit.data.loader import open_shard
    from llmkit.generate import GenerationConfig, generate

    prompt = [int(i) for i in open_shard(data_dir, "val")[:min(16, model.config.max_seq_len // 4)]]
    n_tokens = min(n_tokens, model.config.max_seq_len - len(prompt))
    model.eval()
    out = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=cfg.seed))[0]
    model.train()
    return tok.decode(prompt) + out.text


# --- metrics ---------------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl (one JSON object per logged step) and the loss-curve PNG."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled
        self.rows: list[dict] = []
        if enabled and resume_step is not None and self.path.exists():  # drop what a killed run logged after its checkpoint
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
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
        val = [(r["step"], r["loss"]) for r in self.rows if r.get("split") == "val"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if train:
            ax.plot(*zip(*train), label="train", alpha=0.8)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
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

    from llmkit.data.loader import WindowLoader, check_tokenizer, load_meta
    from llmkit.model.weights import _aliases, load_state, save_model
    from llmkit.progress import progress
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.checkpoint import load_checkpoint, resume_point, save_checkpoint

    # ---------------------------------------------------------------- setup
    if cfg.family not in DEFAULT_PRESETS:
        raise LlmkitError(f"unknown family {cfg.family!r}", "use decoder, encoder or encoder-decoder")
    budget = Budget.parse(cfg.budget)
    d = init_distributed()
    say = log if d.main else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    ckpt_path = resume_point(run_dir, cfg.resume)
    torch.manual_seed(cfg.seed)
    data_dir = prepare_data(cfg, d, say)
    meta = load_meta(data_dir)
    tok = Tokenizer.load(data_dir)
    check_tokenizer(meta, tok)
    model = build(cfg, tok.vocab_size).to(d.device)
    mcfg = model.config
    objective = Objective(cfg, tok, d.rank)
    loader = WindowLoader(data_dir, "train", window=objective.window, batch_size=cfg.batch_size, seed=cfg.seed,
                          rank=d.rank, world_size=d.world)
    step, tokens_seen, elapsed_before, best_val, bad_evals = 0, 0, 0.0, float("inf"), 0
    opt_state = None
    if ckpt_path is not None:
        model_state, opt_state, state = load_checkpoint(ckpt_path)
        if state["model_config"] != mcfg.to_dict() or state["tokenizer"] != tok.fingerprint():
            raise LlmkitError(f"the checkpoint in {ckpt_path} belongs to another model or tokenizer than this command builds",
                              "resume with the same options as the original run (its train_config.json lists them)")
        load_state(model, model_state, source=str(ckpt_path))  # full weights, before any sharding
        torch.set_rng_state(state["rng_torch"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        best_val, bad_evals = state["best_val"], state["bad_evals"]
        say(f"resumed from {ckpt_path} at step {step}")
    amp = autocast_dtype(cfg.precision, d.device)
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

            set_optimizer_state_dict(train_model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state)
    if cfg.compile:
        train_model = torch.compile(train_model)
    flops = mcfg.flops_per_token(cfg.block_size)["train"]
    peak, peak_source = (cfg.peak_flops, "given") if cfg.peak_flops else peak_flops(d.device, amp)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world * cfg.block_size
    metrics = Metrics(run_dir, d.main, step if ckpt_path is not None else None)
    if d.main:
        io.write_json(run_dir / "train_config.json", {**dataclasses.asdict(cfg), "data_dir": str(data_dir), "world_size": d.world})
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{mcfg.family} {cfg.preset or DEFAULT_PRESETS[cfg.family]}: {n_params:,} parameters, vocab {tok.vocab_size}, "
        f"context {cfg.block_size}, {tokens_per_step:,} tokens/step, {d.world} process(es) on {d.device.type}, "
        f"precision {amp or 'fp32'}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")

    def full_state():
        """(model state, optimizer state), gathered whole on every rank when the model is sharded."""
        if not sharded:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(train_model, options=opts), get_optimizer_state_dict(train_model, optimizer, options=opts)

    def checkpoint():
        model_state, opt_state = full_state()
        if d.main:
            aliases = _aliases(model)
            save_checkpoint(run_dir, model_state={k: v for k, v in model_state.items() if k not in aliases}, optimizer_state=opt_state,
                            state={"step": step, "tokens": tokens_seen, "elapsed": elapsed, "best_val": best_val, "bad_evals": bad_evals,
                                   "model_config": mcfg.to_dict(), "tokenizer": tok.fingerprint()})
        _barrier(d)

    # ---------------------------------------------------------------- train
    train_model.train()
    start = time.perf_counter()
    elapsed, stop_reason, last_val = elapsed_before, None, None
    window_start, window_tokens = time.perf_counter(), 0
    total = budget.steps or budget.tokens or budget.seconds or 1
    with progress("steps" if budget.steps else ("tokens" if budget.tokens else "s"), disable=None if d.main else True) as bar:
        task = bar.add_task("pretrain", total=total)
        while True:
            elapsed = elapsed_before + time.perf_counter() - start
            stop_reason = budget.exhausted(step, tokens_seen, elapsed)
            if d.world > 1:  # all ranks stop together (time differs between processes)
                stop_reason = stop_reason if _all_reduce_sum([1.0 if stop_reason else 0.0], d)[0] > 0 else None
                stop_reason = stop_reason or ("time budget reached on another rank" if budget.seconds and elapsed >= budget.seconds else None)
            if stop_reason:
                break
            lr = learning_rate(cfg, step, budget.progress(step, tokens_seen, elapsed))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = loader.batch(step * cfg.grad_accum + micro)
                sync = micro == cfg.grad_accum - 1 or d.world == 1 or cfg.fsdp
                ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else contextlib.nullcontext()
                with ctx, torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, _ = objective.loss(train_model, batch, (cfg.seed, step, micro, d.rank))
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
            if not math.isfinite(loss_sum):
                raise LlmkitError(f"the loss became {loss_sum} at step {step}", "lower --lr, or use --precision fp32")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = elapsed_before + time.perf_counter() - start
            if step % cfg.log_every == 0 or step == 1:
                loss_mean = _all_reduce_sum([loss_sum], d)[0] / d.world
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                mfu = flops * tps / peak
                metrics.log({"step": step, "split": "train", "loss": loss_mean, "lr": lr, "tokens": tokens_seen,
                             "tokens_per_s": tps, "mfu": mfu, "elapsed": round(elapsed, 2)})
                bar.update(task, description=f"loss {loss_mean:.3f} | {tps:,.0f} tok/s | MFU {mfu:.1%}")
            bar.update(task, completed=step if budget.steps else (tokens_seen if budget.tokens else elapsed))
            evaluating = step % cfg.eval_every == 0
            if evaluating:
                last_val = evaluate(model, objective, cfg, data_dir, meta, d, amp)
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

    # ---------------------------------------------------------------- cleanup
    final_val = last_val if last_val is not None and step % cfg.eval_every == 0 else evaluate(model, objective, cfg, data_dir, meta, d, amp)
    if step % cfg.eval_every:
        metrics.log({"step": step, "split": "val", **final_val, "tokens": tokens_seen, "elapsed": round(elapsed, 2)})
    checkpoint()
    final_state = full_state()[0]
    train_rows = [r for r in metrics.rows if r.get("split") == "train"]
    summary = {"stop_reason": stop_reason, "steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 1),
               "tokens_per_s": tokens_seen / max(elapsed - elapsed_before, 1e-9) if step else 0.0,
               "mfu": (sum(r["mfu"] for r in train_rows[-20:]) / len(train_rows[-20:])) if train_rows else 0.0,
               "val_loss": final_val["loss"], "val_ppl": final_val["ppl"], "val_bpb": final_val["bpb"], "parameters": n_params,
               "family": cfg.family, "preset": cfg.preset or DEFAULT_PRESETS[cfg.family], "world_size": d.world}
    if d.main:
        save_model(model, run_dir, tokenizer=tok, state=final_state)
        if cfg.family == "decoder" and cfg.samples and not sharded:
            summary["sample"] = sample_text(model, tok, data_dir, cfg)
        metrics.plot(run_dir / "loss.png")
        _write_report(run_dir, summary)
        say(f"stopped: {stop_reason}. {step} steps, {tokens_seen:,} tokens in {elapsed:.0f}s; "
            f"val loss {final_val['loss']:.4f}, ppl {final_val['ppl']:.2f}, {final_val['bpb']:.4f} bits/byte -> {run_dir}")
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def _append_sample(run_dir: Path, step: int, text: str) -> None:
    with open(run_dir / "samples.md", "a", encoding="utf-8") as f:
        f.write(f"## step {step}\n\n```\n{text}\n```\n\n")


def _write_report(run_dir: Path, s: dict) -> None:
    lines = ["# pretraining run", "", f"- family: {s['family']} ({s['preset']}), {s['parameters']:,} parameters",
             f"- stopped: {s['stop_reason']}", f"- {s['steps']} steps, {s['tokens']:,} tokens, {s['seconds']} s, "
             f"{s['tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}",
             f"- validation: loss {s['val_loss']:.4f} nats/token, perplexity {s['val_ppl']:.2f}, {s['val_bpb']:.4f} bits per byte",
             "", "![loss](loss.png)", ""]
    if s.get("sample"):
        lines += ["## sample", "", "```", s["sample"], "```", ""]
    io.write_text(run_dir / "report.md", "\n".join(lines))
