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

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit import io
from llmkit.data.loader import SAMPLINGS, WindowLoader, check_tokenizer, load_meta, open_shard
from llmkit.data.prepare import FORMAT_VERSION, source_fingerprint, split_corpus, write_shards
from llmkit.devices import resolve as resolve_device
from llmkit.errors import LlmkitError
from llmkit.evaluate.perplexity import summarize
from llmkit.generate import GenerationConfig, generate
from llmkit.model import ModelConfig, build_model, preset
from llmkit.model.config import PRESETS
from llmkit.model.convert.own import save_model
from llmkit.model.convert.tensors import _aliases, load_state
from llmkit.progress import progress
from llmkit.tokenizer import SpecialTokens, Tokenizer, train_tokenizer
from llmkit.tokenizer.core import N_SENTINELS
from llmkit.train import objectives
from llmkit.train.checkpoint import load_checkpoint, rank_keys, resume_point, rng_states, save_checkpoint, set_rng_states
from llmkit.train.optim import Muon, make_optimizer
from llmkit.train.runtime import (
    Budget,
    Dist,
    Metrics,
    accumulate_gradients,
    all_gather,
    all_reduce,
    autocast_dtype,
    barrier,
    init_distributed,
    lr_scale,
    peak_flops,
)

DEFAULT_BUDGET = "5m"
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
    budget: str | None = None  # 5m, 300s, 1h, 2000steps, 2000, 5Mtokens; several joined by commas. None: DEFAULT_BUDGET,
    # or with `resume` the run's own (a finished run is then refused: nothing is left to train; a larger budget extends it)
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
    save_minutes: float = 10.0  # and whenever this many minutes passed since the last checkpoint (0: never by time), so a
    # run killed before its first evaluation keeps its work
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool | None = None  # None: on for a single-process decoder on a CPU (it pays: 1.3x), unless LLMKIT_COMPILE=0
    seed: int = 1337
    out: str = "runs/pretrain"
    resume: bool = False
    peak_flops: float | None = None
    fsdp: bool = False
    device: str = "auto"  # one process: auto (CUDA, then MPS, then the CPU) | cpu | cuda:N | mps; torchrun: each rank's GPU
    samples: bool = True


# --- data --------------------------------------------------------------------------------------------------


def _sentinels(cfg: PretrainConfig) -> int:
    """T5's sentinel tokens <extra_id_N> for span corruption; decoders and encoders never see them (100 rows of the
    default 1,280-token head would be dead weight)."""
    return N_SENTINELS if cfg.family == "encoder-decoder" else 0


def prepare_data(cfg: PretrainConfig, d: Dist, log) -> Path:
    """A prepared shard folder: `cfg.data` itself, or a source prepared into OUT/data with a new tokenizer.

    The corpus is split once: the tokenizer learns from exactly the training documents the shards hold. OUT/data
    records what it was prepared from; a folder left by another source, vocabulary or tokenizer kind (say a run that
    died before its first checkpoint) is prepared again rather than reused."""
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
            recipe["source_sha256"] = source_fingerprint(cfg.data)
        stale = (
            meta is not None and not cfg.resume and {**meta.get("prepared_for", {}), "source_sha256": meta.get("source_sha256")} != recipe
        )
        if stale and meta is not None:  # a resumed run keeps its own data: its checkpoint's tokenizer fingerprint is checked
            log(f"{data_dir} was prepared from other options ({meta.get('prepared_for')}); preparing it again")
            (data_dir / "meta.json").unlink()
            meta = None
        if meta is None:
            recipe.setdefault("source_sha256", source_fingerprint(cfg.data))
            cached = prepared_cache(recipe)
            if cached is not None and (cached / "meta.json").exists():
                log(f"preparing {cfg.data}: the shards and tokenizer of an earlier run with the same text and options ({cached})")
                _copy_whole(cached, data_dir)
            else:
                log(f"preparing {cfg.data}: training a {cfg.tokenizer_kind} tokenizer ({cfg.vocab_size} tokens) on its training split")
                split = split_corpus(cfg.data, val_fraction=val_fraction, seed=cfg.seed, log=log)
                tok = train_tokenizer(
                    split.train,
                    cfg.tokenizer_kind,
                    cfg.vocab_size,
                    byte_fallback=byte_fallback,
                    special=SpecialTokens(sentinels=sentinels),
                    show_progress=sys.stderr.isatty(),  # the tokenizers library's own bars: a unigram takes a minute or two
                )
                write_shards(split, tok, data_dir, source=cfg.data, extra={"prepared_for": recipe})
                if cached is not None:
                    _store(data_dir, cached)
    barrier(d)
    load_meta(data_dir)
    return data_dir


def prepared_cache(recipe: dict) -> Path | None:
    """Where shards prepared by `recipe` (its text's hash included) are kept for the next run with the same options:
    $LLMKIT_CACHE/prepared/KEY (default ~/.cache/llmkit; LLMKIT_CACHE=off keeps nothing). A second pretraining run on
    the same text then starts in seconds instead of training the same tokenizer again."""
    root = os.environ.get("LLMKIT_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit")
    if root.lower() in ("off", "0", "none"):
        return None
    import tokenizers

    # the code that wrote them is part of the key: another shard format or tokenizers release prepares afresh
    import llmkit

    made_by = {"format": FORMAT_VERSION, "llmkit": llmkit.__version__, "tokenizers": tokenizers.__version__}
    key = hashlib.sha256(json.dumps({**recipe, **made_by}, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / "prepared" / key


def _copy_whole(src: Path, dst: Path) -> None:
    """Copy a folder so that `dst` is whole or absent (a copy under another name, then one rename): a copy cut short
    never leaves a meta.json beside missing shards."""
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _store(data_dir: Path, cached: Path) -> None:
    """Keep a prepared folder in the cache, whole; a cache that cannot be written (a read-only home, a race with another
    run storing the same entry) only costs the next run its time."""
    if cached.exists():  # stored meanwhile by another run: readers may be copying it
        return
    try:
        _copy_whole(data_dir, cached)
    except OSError:
        shutil.rmtree(cached.with_name(f"{cached.name}.tmp-{os.getpid()}"), ignore_errors=True)


# --- the model and its loss ----------------------------------------------------------------------------------


def build(cfg: PretrainConfig, vocab_size: int):
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
    nats, count, byte_nats, n_bytes = all_reduce([nats, float(count), byte_nats, n_bytes], d)
    model.train()
    out = summarize(nats, int(count), n_bytes)
    bpb = byte_nats / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"loss": out["nats_per_token"], "ppl": out["perplexity"], "bpb": bpb, "windows": n_win}


def sample_text(model, tok, data_dir: Path, cfg: PretrainConfig, n_tokens: int = 120) -> str:
    prompt = [int(i) for i in open_shard(data_dir, "val")[: min(16, model.config.max_seq_len // 4)]]
    n_tokens = min(n_tokens, model.config.max_seq_len - len(prompt))
    model.eval()
    out = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=cfg.seed))[0]
    model.train()
    # decoded together (a unigram's decoder drops the space before a first piece), without special tokens: a tokenizer
    # from `llmkit tokenizer train` holds T5's sentinels, which an early decoder samples as often as any token
    return tok.decode(prompt + out.ids, skip_special_tokens=True)


# --- the recipe ---------------------------------------------------------------------------------------------------


class Pretraining:
    """The recipe as named phases over one run's state (torchtune's recipe shape, no inheritance needed):

        setup()     check the options, processes, data and tokenizer, model, resume, sharding, optimizer, compile
        train()     steps until the budget, the plateau or an error stops them (`train_step`, `log_step`, `evaluate`,
                    `checkpoint`, then `after_step`, a no-op hook)
        cleanup()   the final evaluation and checkpoint, weights, report; returns the summary

    `pretrain(cfg)` runs the three; a test or a variant overrides a phase or the hook."""

    def __init__(self, cfg: PretrainConfig, *, log=print):
        self.cfg, self.log = cfg, log
        self.finished: str | None = None  # why the run stopped, once it has

    def run(self) -> dict:
        self.setup()
        self.train()
        return self.cleanup()

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        check_options(cfg)
        self.run_dir = Path(cfg.out)
        self.ckpt_path = resume_point(self.run_dir, cfg.resume)
        if cfg.budget is None:  # a resumed run keeps its own budget; a new one takes the default
            saved = self.run_dir / "train_config.json"
            own = io.read_json(saved).get("budget") if self.ckpt_path is not None and saved.exists() else None
            self.cfg = cfg = dataclasses.replace(cfg, budget=own or DEFAULT_BUDGET)
        self.budget = Budget.parse(cfg.budget or DEFAULT_BUDGET)
        self.d = d = init_distributed()
        if d.world == 1:
            self.d = d = Dist(device=resolve_device(cfg.device))
        self.say = self.log if d.main else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data_dir = prepare_data(cfg, d, self.say)
        self._data_and_model()
        self._resume()
        self._parallelize()
        self._describe()

    def _data_and_model(self) -> None:
        cfg, d = self.cfg, self.d
        meta = load_meta(self.data_dir)
        if meta["val_tokens"] < 2:
            raise LlmkitError(
                f"the validation shard of {self.data_dir} has {meta['val_tokens']} tokens: nothing to evaluate on",
                "prepare the data with a validation split (--val-fraction 0.1) or more text",
            )
        self.tok = Tokenizer.load(self.data_dir)
        check_tokenizer(meta, self.tok)
        self.model = build(cfg, self.tok.vocab_size).to(d.device)
        torch.manual_seed(cfg.seed + 1_000_003 * d.rank)  # dropout: each rank its own masks
        if d.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + 1_000_003 * d.rank)
        self.objective = Objective(cfg, self.tok, d.rank)
        self.loader = WindowLoader(
            self.data_dir,
            "train",
            window=self.objective.window,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world,
            sampling=cfg.sampling,
            stride=cfg.block_size,  # a decoder's windows (block + 1 tokens) overlap by one: every token is a target once per epoch
        )
        self.global_batch = cfg.batch_size * d.world * cfg.grad_accum  # rows per optimizer step, all ranks and micro-steps
        # tokens_seen's unit: rows x block size
        self.budget.limit_epochs(cfg.max_epochs, self.loader.windows_per_epoch() * cfg.block_size)

    def _resume(self) -> None:
        """The run's counters, from its checkpoint when it resumes (the weights loaded before any sharding)."""
        cfg, budget, say = self.cfg, self.budget, self.say
        self.step, self.tokens_seen, self.elapsed_before, self.best_val, self.bad_evals = 0, 0, 0.0, float("inf"), 0
        self.warm_progress: float | None = None
        self.opt_state = self.scaler_state = self.saved_autocast = None
        if self.ckpt_path is None:
            return
        model_state, self.opt_state, state = load_checkpoint(self.ckpt_path)
        if (
            ModelConfig.from_dict(state["model_config"]).to_dict() != self.model.config.to_dict()
            or state["tokenizer"] != self.tok.fingerprint()
        ):
            raise LlmkitError(
                f"the checkpoint in {self.ckpt_path} belongs to another model or tokenizer than this command builds",
                "resume with the same options as the original run (its train_config.json lists them)",
            )
        if state.get("finished"):  # the run ended: it trains on only where the limits now given leave room
            if budget.exhausted(state["step"], state["tokens"], state["elapsed"]):
                raise LlmkitError(
                    f"the run in {self.run_dir} is finished ({state['finished']}, {state['step']} steps): nothing is left to resume",
                    f"give a larger --budget than its {state.get('budget')} (or --max-epochs) to train it further, or a new --out",
                )
            say(f"extending the finished run in {self.run_dir}: budget {state.get('budget')} -> {cfg.budget}")
        load_state(self.model, model_state, source=str(self.ckpt_path))  # full weights, before any sharding
        d = self.d
        set_rng_states(state["rng"], d.rank, fallback_seed=cfg.seed + 1_000_003 * d.rank + state["step"], log=self.log)
        self.step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        # a checkpoint from before warm_progress was saved: its cosine ran from the start of the budget
        self.warm_progress = state.get("warm_progress", 0.0 if self.step > cfg.warmup else None)
        self.scaler_state = state.get("grad_scaler")
        self.saved_autocast = state.get("autocast")
        say(f"resumed from {self.ckpt_path} at step {self.step}")
        if "epoch_limit" not in state and budget.epoch_limit:  # a run from before the limit, resumed with the same flags
            say(
                f"[yellow]warning:[/] the run started without an epoch limit and now stops after {budget.epochs:g} epochs "
                f"({budget.epoch_limit:,} tokens; it has seen {self.tokens_seen:,}): resume with --max-epochs 0 to go on without"
            )
        before = state.get("sampling", "random")
        if before != cfg.sampling:  # a run from before the shuffled default, resumed with the default flags
            say(f"[yellow]warning:[/] the run drew its windows with --sampling {before}; it goes on with {cfg.sampling}")
        elif cfg.sampling == "shuffle" and state.get("global_batch", self.global_batch) != self.global_batch:
            say(
                f"[yellow]warning:[/] the global batch was {state['global_batch']} rows and is now {self.global_batch}: this "
                f"epoch's window order goes on from row {self.step} × {self.global_batch}, so some of its windows are skipped "
                f"or seen twice"
            )

    def _parallelize(self) -> None:
        """Precision, DDP or FSDP2, the optimizer (after sharding: FSDP2 replaces the parameters), loss scaling, compile."""
        cfg, d, model = self.cfg, self.d, self.model
        self.amp = autocast_dtype(cfg.precision, d.device, measure=d.world == 1)  # measured for one process; ranks must agree
        if cfg.precision == "auto" and self.saved_autocast is not None:  # a resumed run keeps its choice
            self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.saved_autocast]
        self.train_model = model
        self.sharded = d.world > 1 and cfg.fsdp
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "blocks", []) or []:
                fully_shard(block)
            self.train_model = fully_shard(model)
        elif d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        self.optimizer = make_optimizer(model, cfg, d.device)
        if self.opt_state is not None:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                options = StateDictOptions(full_state_dict=True)
                set_optimizer_state_dict(self.train_model, self.optimizer.optimizers, self.opt_state, options=options)
            else:
                self.optimizer.load_state_dict(self.opt_state)
        # float16 needs loss scaling (small gradients underflow to zero), as nanoGPT does; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp == torch.float16)
        if self.scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.scaler_state)
        compiled = cfg.compile
        if compiled is None:  # measured on 2 cores: the 5-minute default trains 1.3x faster compiled, the compile included
            compiled = d.device.type == "cpu" and d.world == 1 and cfg.family == "decoder" and os.environ.get("LLMKIT_COMPILE", "1") != "0"
        if compiled:
            self.train_model = torch.compile(self.train_model)
        self.compiled = bool(compiled)

    def _describe(self) -> None:
        """train_config.json, and one line that says what trains on what."""
        cfg, d, mcfg, budget = self.cfg, self.d, self.model.config, self.budget
        self.flops = mcfg.flops_per_token(cfg.block_size)["train"]
        self.peak, peak_source = (cfg.peak_flops, "given") if cfg.peak_flops else peak_flops(d.device, self.amp)
        self.tokens_per_step = self.global_batch * cfg.block_size
        self.metrics = Metrics(self.run_dir, d.main, self.step if self.ckpt_path is not None else None)
        muon_ns = next((str(o.ns_dtype).removeprefix("torch.") for o in self.optimizer.optimizers if isinstance(o, Muon)), None)
        if d.main:
            io.write_json(
                self.run_dir / "train_config.json",
                {
                    **dataclasses.asdict(cfg),
                    "data_dir": str(self.data_dir),
                    "world_size": d.world,
                    "peak_flops_per_process": self.peak,
                    "peak_flops_source": peak_source,
                    "muon_newton_schulz": muon_ns,
                },
            )
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.say(
            f"{mcfg.family} {cfg.preset or DEFAULT_PRESETS[cfg.family]}: {self.n_params:,} parameters, vocab {self.tok.vocab_size}, "
            f"context {cfg.block_size}, {self.tokens_per_step:,} tokens/step, {d.world} process(es) on {d.device.type}, "
            f"precision {self.amp or 'fp32'}{' with loss scaling' if self.scaler.is_enabled() else ''}"
            f"{f', at most {budget.epochs:g} epochs of {budget.epoch_tokens:,} tokens' if budget.epoch_limit else ''}"
            f"{f', Muon orthogonalizing in {muon_ns}' if muon_ns else ''}; peak {self.peak / 1e9:.0f} GFLOP/s per process "
            f"({peak_source})"
        )

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        cfg, d, budget = self.cfg, self.d, self.budget
        self.train_model.train()
        if self.compiled:
            self._compile_step()
        self.start = time.perf_counter()
        self.tokens_at_start = self.tokens_seen
        self.elapsed, self.stop_reason, self.nonfinite = self.elapsed_before, None, 0.0
        self.clock = self.saved_at = self.elapsed_before  # the clock every rank agrees on (`_should_stop`), at the last checkpoint
        self.window_start, self.window_tokens = time.perf_counter(), 0
        total = budget.steps or budget.tokens or budget.seconds or 1
        with progress("steps" if budget.steps else ("tokens" if budget.tokens else "s"), disable=None if d.main else True) as bar:
            task = bar.add_task("pretrain", total=total)
            while not self._should_stop():
                lr, loss_local, n_targets = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == 1:
                    row = self.log_step(lr, loss_local, n_targets)
                    bar.update(task, description=f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | MFU {row['mfu']:.1%}")
                bar.update(task, completed=self.step if budget.steps else (self.tokens_seen if budget.tokens else self.elapsed))
                evaluating = self.step % cfg.eval_every == 0
                if evaluating:
                    self.evaluate()
                # by the shared clock, so every rank checkpoints at the same step (a checkpoint gathers from all of them)
                timed = cfg.save_minutes > 0 and self.clock - self.saved_at >= 60 * cfg.save_minutes
                if evaluating and cfg.save_every is None or cfg.save_every and self.step % cfg.save_every == 0 or timed:
                    self.checkpoint()
                    self.saved_at = self.clock
                self.after_step()
                if cfg.patience and self.bad_evals >= cfg.patience:
                    self.stop_reason = f"validation loss plateau ({cfg.patience} evaluations without improvement)"
                    break
            bar.update(task, completed=total)  # the run is over, whichever limit ended it

    def _compile_step(self) -> None:
        """Compile the training step before the budget's clock starts (a 60 s budget then trains for 60 s): one forward
        and backward of this step's first micro-batch, its gradients dropped and the random generators put back."""
        cfg, t = self.cfg, time.perf_counter()
        self.say("compiling the training step for this machine, once (the budget starts after it; --no-compile skips it)")
        states = rng_states()
        rows, index = self.loader.rows(self.step, 0, cfg.grad_accum)
        batch = self.objective.prepare(rows, [(cfg.seed, self.step, i) for i in index])
        loss_fn = lambda p: self.objective.loss_sum(self.train_model, p)[0]  # noqa: E731
        accumulate_gradients(self.train_model, [batch], loss_fn, [batch.n_targets], self.d, self.amp, None, self.sharded)
        self.optimizer.zero_grad(set_to_none=True)
        set_rng_states(rank_keys(states, self.d.rank), self.d.rank)
        self.say(f"compiled in {time.perf_counter() - t:.0f}s")

    def after_step(self) -> None:
        """Called after every step (its checkpoint included): a hook for tests and variants; nothing by default."""

    def _should_stop(self) -> bool:
        """Whether the budget is spent: one decision and one clock for all ranks (the slowest clock; any rank's stop
        stops all, and a loss that diverged on any rank stops them with an error)."""
        d, budget = self.d, self.budget
        self.elapsed = self.elapsed_before + time.perf_counter() - self.start
        self.stop_reason = budget.exhausted(self.step, self.tokens_seen, self.elapsed)
        if d.world > 1:
            self.elapsed, stopping, diverged = all_reduce([self.elapsed, 1.0 if self.stop_reason else 0.0, self.nonfinite], d, op="max")
            if diverged:
                raise LlmkitError(
                    f"the loss became infinite or NaN at step {self.step - 1} on a rank", "lower --lr, or use --precision fp32"
                )
            self.stop_reason = (
                self.stop_reason
                or budget.exhausted(self.step, self.tokens_seen, self.elapsed)
                or ("budget reached on another rank" if stopping else None)
            )
        self.clock = self.elapsed
        return bool(self.stop_reason)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step: the lr of this point of the budget, grad_accum micro-batches, clip, step. Returns (lr,
        this rank's summed loss, the step's target count)."""
        cfg, d, optimizer, scaler = self.cfg, self.d, self.optimizer, self.scaler
        progress_now = self.budget.progress(self.step, self.tokens_seen, self.elapsed)
        if self.step >= cfg.warmup and self.warm_progress is None:  # where the cosine starts: the budget used when warmup ended
            exact = not (self.budget.tokens or self.budget.seconds or self.budget.epoch_limit)
            self.warm_progress = cfg.warmup / self.budget.steps if self.budget.steps and exact else progress_now
        scale = lr_scale(cfg, self.step, progress_now, self.warm_progress or 0.0)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        micro = []
        for m in range(cfg.grad_accum):
            rows, index = self.loader.rows(self.step, m, cfg.grad_accum)
            micro.append(self.objective.prepare(rows, [(cfg.seed, self.step, i) for i in index]))
        train_model = self.train_model
        loss_local, n_targets = accumulate_gradients(
            train_model,
            micro,
            lambda p: self.objective.loss_sum(train_model, p)[0],
            [p.n_targets for p in micro],
            d,
            self.amp,
            scaler,
            self.sharded,
        )
        if not math.isfinite(loss_local):
            if d.world == 1:
                raise LlmkitError(f"the loss became {loss_local} at step {self.step}", "lower --lr, or use --precision fp32")
            self.nonfinite = 1.0  # every rank hears of it at the next step's all-reduce and stops together
        if cfg.grad_clip:
            for opt in optimizer.optimizers:  # GradScaler takes each optimizer on its own (Muon and AdamW)
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
        for opt in optimizer.optimizers:
            scaler.step(opt)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.window_tokens += self.tokens_per_step
        self.elapsed = self.elapsed_before + time.perf_counter() - self.start
        return cfg.lr * scale, loss_local, n_targets

    def log_step(self, lr: float, loss_local: float, n_targets: int) -> dict:
        """A train row of metrics.jsonl: the mean loss over every target of the step, tokens/s since the last row, MFU."""
        d = self.d
        loss_mean = all_reduce([loss_local], d)[0] / max(n_targets, 1)
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)  # all processes' tokens
        self.window_start, self.window_tokens = now, 0
        mfu = self.flops * tps / (self.peak * d.world)  # against every process's peak, not one
        row = {
            "step": self.step,
            "split": "train",
            "loss": loss_mean,
            "lr": lr,
            "tokens": self.tokens_seen,
            "tokens_per_s": tps,
            "mfu": mfu,
            "elapsed": round(self.elapsed, 2),
        }
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        self.metrics.log(row)
        return row

    def evaluate(self) -> None:
        """Validation loss, perplexity and bits per byte; a sample (decoders); the plateau count; the plot."""
        cfg, d = self.cfg, self.d
        val = evaluate(self.model, self.objective, cfg, self.data_dir, d, self.amp)
        self.metrics.log({"step": self.step, "split": "val", **val, "tokens": self.tokens_seen, "elapsed": round(self.elapsed, 2)})
        if cfg.family == "decoder" and cfg.samples and d.main and not self.sharded:
            text = sample_text(self.model, self.tok, self.data_dir, cfg)
            self.metrics.log({"step": self.step, "split": "sample", "text": text})
            _append_sample(self.run_dir, self.step, text)
        self.say(f"step {self.step}: val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}, {val['bpb']:.4f} bits/byte")
        if val["loss"] < self.best_val - 1e-4:
            self.best_val, self.bad_evals = val["loss"], 0
        else:
            self.bad_evals += 1
        self.metrics.plot(self.run_dir / "loss.png")

    def full_state(self) -> tuple[dict, dict]:
        """(model state, optimizer state), gathered whole on every rank when the model is sharded."""
        if not self.sharded:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(self.train_model, options=opts),
            get_optimizer_state_dict(self.train_model, self.optimizer.optimizers, options=opts),
        )

    def checkpoint(self) -> None:
        cfg, d = self.cfg, self.d
        model_state, opt_state = self.full_state()
        rngs = all_gather(rng_states(), d)  # every rank's generators, so dropout resumes exactly on each
        if d.main:
            aliases = _aliases(self.model)
            save_checkpoint(
                self.run_dir,
                model_state={k: v for k, v in model_state.items() if k not in aliases},
                optimizer_state=opt_state,
                state={
                    "step": self.step,
                    "tokens": self.tokens_seen,
                    "elapsed": self.elapsed,
                    "best_val": self.best_val,
                    "bad_evals": self.bad_evals,
                    "warm_progress": self.warm_progress,
                    "model_config": self.model.config.to_dict(),
                    "tokenizer": self.tok.fingerprint(),
                    "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "world_size": d.world,
                    "sampling": cfg.sampling,
                    "global_batch": self.global_batch,
                    "epoch_limit": self.budget.epoch_limit,
                    "budget": cfg.budget,
                    "finished": self.finished,  # why the run stopped, once it has (its last checkpoint)
                    "autocast": {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.amp],
                },
                rng={k: v for r, states in enumerate(rngs) for k, v in rank_keys(states, r).items()},
            )
        barrier(d)

    # ---------------------------------------------------------------- cleanup

    def cleanup(self) -> dict:
        """The final model on the whole validation shard (up to --final-eval-tokens: 5 s on 2 cores for Shakespeare's),
        the last checkpoint, the weights, the plot and report.md. Returns the summary."""
        cfg, d, step, elapsed = self.cfg, self.d, self.step, self.elapsed
        final_val = evaluate(self.model, self.objective, cfg, self.data_dir, d, self.amp, final=True)
        self.finished = self.stop_reason
        self.metrics.log(
            {"step": step, "split": "val", "final": True, **final_val, "tokens": self.tokens_seen, "elapsed": round(elapsed, 2)}
        )
        self.checkpoint()
        final_state = self.full_state()[0]
        train_rows = [r for r in self.metrics.rows if r.get("split") == "train"]
        session_tokens = self.tokens_seen - self.tokens_at_start
        summary = {
            "stop_reason": self.stop_reason,
            "steps": step,
            "tokens": self.tokens_seen,
            "seconds": round(elapsed, 1),
            # this session's rate: the tokens since it started (or resumed) over the time since then
            "session_tokens": session_tokens,
            "session_seconds": elapsed - self.elapsed_before,
            "tokens_per_s": session_tokens / max(elapsed - self.elapsed_before, 1e-9) if step else 0.0,
            "mfu": (sum(r["mfu"] for r in train_rows[-20:]) / len(train_rows[-20:])) if train_rows else 0.0,
            "val_loss": final_val["loss"],
            "val_ppl": final_val["ppl"],
            "val_bpb": final_val["bpb"],
            "val_windows": final_val["windows"],
            "parameters": self.n_params,
            "family": cfg.family,
            "preset": cfg.preset or DEFAULT_PRESETS[cfg.family],
            "world_size": d.world,
        }
        if d.main:
            save_model(self.model, self.run_dir, tokenizer=self.tok, state=final_state)
            if cfg.family == "decoder" and cfg.samples and not self.sharded:
                summary["sample"] = sample_text(self.model, self.tok, self.data_dir, cfg)
                _append_sample(self.run_dir, step, summary["sample"])  # samples.md has the final model's too (short runs: only it)
            self.metrics.plot(self.run_dir / "loss.png")
            _write_report(self.run_dir, summary)
            self.say(
                f"stopped: {self.stop_reason}. {step} steps, {self.tokens_seen:,} tokens in {elapsed:.0f}s; "
                f"val loss {final_val['loss']:.4f}, ppl {final_val['ppl']:.2f}, {final_val['bpb']:.4f} bits/byte -> {self.run_dir}"
            )
        if d.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
        return summary


def pretrain(cfg: PretrainConfig, *, log=print) -> dict:
    """Run the recipe (`Pretraining`: setup -> train -> cleanup); returns the summary written to report.md."""
    return Pretraining(cfg, log=log).run()


def check_options(cfg: PretrainConfig) -> None:
    """The options that no later step would refuse clearly, refused before any data is prepared."""
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
    if cfg.eval_windows < 1:
        raise LlmkitError(f"--eval-windows {cfg.eval_windows} scores nothing", "use 1 or more (default: 64)")


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
