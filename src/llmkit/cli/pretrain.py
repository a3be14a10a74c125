"""`llmkit pretrain`: train a decoder, encoder or encoder-decoder from random weights."""

from __future__ import annotations

import argparse

from llmkit.cli.common import console, device_option, subcommand


def register(commands) -> None:
    from llmkit.data.loader import SAMPLINGS
    from llmkit.train.pretrain import PretrainConfig

    d = PretrainConfig()
    p = subcommand(
        commands,
        "pretrain",
        "pretrain a model from random weights (causal LM, masked LM or span corruption)",
        (
            "llmkit pretrain                                   # a small GPT on Shakespeare, about five minutes on 2 cores",
            "llmkit pretrain --family encoder --budget 2m --out runs/bert",
            "llmkit pretrain --family encoder-decoder --preset tiny-t5 --budget 1000steps --out runs/t5",
            "llmkit pretrain --data runs/data --preset gpt2 --block-size 1024 --batch-size 16 --precision bf16 --compile",
            "llmkit pretrain --out runs/gpt --resume          # continue a killed run exactly",
            "torchrun --nproc_per_node 2 -m llmkit pretrain --batch-size 16 --out runs/ddp",
        ),
        cmd_pretrain,
    )
    p.add_argument("--family", default=d.family, choices=["decoder", "encoder", "encoder-decoder"], help="model family (default: decoder)")
    p.add_argument(
        "--preset", default=None, help="model preset (default: cpu-modern / tiny-bert / tiny-t5 by family); see `llmkit model info --all`"
    )
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--n-heads", type=int, default=None, help="override the preset's number of heads")
    p.add_argument("--data", default=d.data, help="a prepared shard folder, or a source to prepare: shakespeare (default), files, a glob")
    p.add_argument(
        "--tokenizer-kind",
        default=d.tokenizer_kind,
        help=f"tokenizer trained when --data is a source (default: {d.tokenizer_kind}, with byte fallback)",
    )
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"its vocabulary (default: {d.vocab_size})")
    p.add_argument("--block-size", type=int, default=d.block_size, help=f"context length in tokens (default: {d.block_size})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per process and micro-step (default: {d.batch_size})")
    p.add_argument(
        "--sampling",
        default=d.sampling,
        choices=list(SAMPLINGS),
        help="training windows: shuffle = every window once per epoch in a random order; random = anywhere, independently "
        f"(default: {d.sampling})",
    )
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument(
        "--embedding-lr", type=float, default=d.embedding_lr, help="AdamW's peak learning rate for the input embeddings (default: --lr)"
    )
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a share of the peak (default: 0.1)")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"warmup steps (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices (default: 0.1)")
    p.add_argument(
        "--muon-weight-decay",
        type=float,
        default=d.muon_weight_decay,
        help=f"Muon's decoupled weight decay on the blocks' matrices (default: {d.muon_weight_decay})",
    )
    p.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=["muon", "adamw"],
        help="muon (default): torch.optim.Muon for the blocks' matrices, AdamW (--lr) for embeddings, head and norms; adamw: AdamW for all",
    )
    p.add_argument("--muon-lr", type=float, default=d.muon_lr, help=f"Muon's peak learning rate (default: {d.muon_lr})")
    p.add_argument("--muon-momentum", type=float, default=d.muon_momentum, help=f"Muon's momentum (default: {d.muon_momentum})")
    p.add_argument(
        "--muon-precision",
        default=d.muon_precision,
        choices=["auto", "fp32", "bf16"],
        help="Muon's Newton-Schulz in fp32 or bf16 (default: auto = fp32 on a CPU, where it is faster; bf16 on a GPU, as torch)",
    )
    p.add_argument(
        "--schedule",
        default=d.schedule,
        choices=["wsd", "cosine"],
        help="after warmup: wsd (default: the peak, then a linear decay over the last --cooldown of the budget) or cosine",
    )
    p.add_argument("--cooldown", type=float, default=d.cooldown, help=f"share of the budget the wsd decay takes (default: {d.cooldown})")
    p.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a model config field over the preset's, e.g. activation=gelu, qk_norm=false, logit_softcap=none, "
        "position=learned, tie_embeddings=true (repeatable; see `llmkit model info PRESET`)",
    )
    p.add_argument("--beta1", type=float, default=d.beta1)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm (0: off; default: 1.0)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument(
        "--budget",
        default=None,
        help="when to stop: 5m, 300s, 1h, 2000steps, 5Mtokens, or several joined by commas (default: 5m; with --resume "
        "the run's own: a finished run then says so, and a larger budget trains it further)",
    )
    p.add_argument(
        "--max-epochs",
        type=float,
        default=None,
        help="stop after this many passes over the training windows (default: 4 for a budget of time alone, where more "
        "epochs memorize the data; none for a step or token count; 0: no limit)",
    )
    p.add_argument("--patience", type=int, default=d.patience, help="stop after N evaluations without improvement (0: never)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"evaluate every N steps (default: {d.eval_every})")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=d.eval_windows,
        help=f"validation windows per evaluation during the run, spread over the shard (default: {d.eval_windows})",
    )
    p.add_argument(
        "--final-eval-tokens",
        type=int,
        default=d.final_eval_tokens,
        help=f"the final evaluation scores the whole validation shard up to this many tokens (default: {d.final_eval_tokens:,})",
    )
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: at each evaluation)")
    p.add_argument(
        "--save-minutes",
        type=float,
        default=d.save_minutes,
        help=f"checkpoint too when this many minutes passed since the last one (0: never by time; default: {d.save_minutes:g})",
    )
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast (auto: bf16 where the hardware has it and, measured, its matmuls run faster than float32)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for a single-process decoder on a CPU, where it pays; LLMKIT_COMPILE=0 turns it off)",
    )
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun (default: DDP)")
    device_option(p)
    p.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="peak FLOP/s of one process's device, for MFU (default: datasheet for known GPUs, else measured)",
    )
    p.add_argument("--no-samples", action="store_true", help="do not generate samples at each evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help=f"run folder (default: {d.out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def cmd_pretrain(args) -> None:
    import dataclasses

    from llmkit.train.pretrain import PretrainConfig, pretrain

    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["samples"] = not args.no_samples
    values["model_options"] = parse_model_options(args.model_option)
    pretrain(PretrainConfig(**values), log=lambda m: console().print(m))


def parse_model_options(items: list[str]) -> dict:
    """["qk_norm=false", "logit_softcap=15", "activation=gelu"] -> {"qk_norm": False, "logit_softcap": 15.0, ...}: the
    value read as JSON where it parses (numbers, true/false, null), `none` as null, else as a string."""
    import dataclasses
    import json

    from llmkit.errors import LlmkitError
    from llmkit.model.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fixed = {"vocab_size": "--vocab-size", "max_seq_len": "--block-size", "dropout": "--dropout", "family": "--family"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise LlmkitError(
                f"--model-option {item!r} is not KEY=VALUE with a model config field", f"use one of: {', '.join(sorted(names))}"
            )
        if key in fixed:
            raise LlmkitError(f"--model-option {key} has its own flag", f"use {fixed[key]}")
        raw = raw.strip()
        try:
            value = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            value = None if raw.lower() == "none" else raw
        out[key] = value
    return out
