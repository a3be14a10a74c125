"""`llmkit data`: turn a corpus into token shards (prepare, info)."""

from __future__ import annotations

import json

from llmkit.cli.common import console, group, source_options, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    data_cmds = group(
        commands,
        "data",
        "turn a corpus into token shards",
        ("llmkit data prepare --source shakespeare --tokenizer runs/tok --out runs/data", "llmkit data info runs/data"),
        "data commands",
    )
    p = subcommand(
        data_cmds,
        "prepare",
        "normalize, de-duplicate, split and tokenize a corpus into train.bin / val.bin",
        (
            "llmkit data prepare --source shakespeare --tokenizer runs/tok --out runs/data",
            "llmkit data prepare --source 'corpus/*.txt' --tokenizer smollm2 --near-dedup --out runs/data",
            "llmkit data prepare --source rows.jsonl --field text --tokenizer runs/tok --val-fraction 0.05 --out runs/data",
        ),
        cmd_data_prepare,
    )
    source_options(p)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder, GGUF file, 'smollm2' or 'minilm' (required)")
    p.add_argument("--out", default="runs/data", help="output folder (default: runs/data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation (default: 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split (default: 1337)")
    p.add_argument("--unicode-form", default="NFC", help="Unicode normalization: NFC, NFKC, NFD, NFKD or none (default: NFC)")
    p.add_argument("--keep-line-endings", action="store_true", help="do not turn \\r\\n and \\r into \\n")
    p.add_argument("--near-dedup", action="store_true", help="also drop near-duplicate documents (MinHash LSH)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity that counts as near-duplicate (default: 0.8)")
    p = subcommand(data_cmds, "info", "show what a shard folder holds", ("llmkit data info runs/data",), cmd_data_info)
    p.add_argument("dir", nargs="?", default="runs/data")


def cmd_data_prepare(args) -> None:
    from llmkit.data.prepare import prepare

    if not args.tokenizer:
        raise LlmkitError("`llmkit data prepare` needs --tokenizer", "train one with `llmkit tokenizer train`, or use --tokenizer smollm2")
    form = None if str(args.unicode_form).lower() == "none" else args.unicode_form
    if form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise LlmkitError(f"unknown Unicode form {args.unicode_form!r}", "use NFC, NFKC, NFD, NFKD or none")
    meta = prepare(
        args.source or ["shakespeare"],
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        unicode_form=form,
        newlines=not args.keep_line_endings,
        near_dedup=args.near_dedup,
        near_threshold=args.near_threshold,
        field=args.field,
        log=lambda m: console().print(m),
    )
    if meta["replaced_invalid_utf8_bytes"]:
        console().print(f"[yellow]warning:[/] {meta['replaced_invalid_utf8_bytes']} invalid UTF-8 byte(s) were replaced by U+FFFD")
    print(f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens ({meta['dtype']}) -> {args.out}")


def cmd_data_info(args) -> None:
    from llmkit.data.loader import load_meta

    print(json.dumps(load_meta(args.dir), indent=2))
