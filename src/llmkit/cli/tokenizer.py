"""`llmkit tokenizer`: train, use and compare tokenizers (train, encode, decode, info, compare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmkit.cli.common import console, group, read_corpus, source_options, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    tok_cmds = group(
        commands,
        "tokenizer",
        "train, use and compare tokenizers",
        (
            "llmkit tokenizer train --kind byte-bpe --vocab-size 8192 --source shakespeare --out runs/tok",
            "llmkit tokenizer encode --tokenizer runs/tok 'To be, or not to be'",
            "llmkit tokenizer compare --source shakespeare --json compare.json",
        ),
        "tokenizer commands",
    )

    p = subcommand(
        tok_cmds,
        "train",
        "train a tokenizer and save it as DIR/tokenizer.json",
        (
            "llmkit tokenizer train --kind byte-bpe --vocab-size 8192 --source shakespeare --out runs/tok",
            "llmkit tokenizer train --kind wordpiece --lowercase --source 'notes/*.md' --out runs/wp",
            "llmkit tokenizer train --kind char --source shakespeare:hamlet --out runs/char",
            "llmkit tokenizer train --kind unigram --source rows.jsonl --field body --out runs/uni",
            "llmkit tokenizer train --kind unigram --byte-fallback --vocab-size 1280 --source shakespeare --out runs/uni-bytes",
        ),
        cmd_tokenizer_train,
    )
    source_options(p)
    p.add_argument("--kind", default="byte-bpe", help="word, char, bpe, wordpiece, byte-bpe or unigram (default: byte-bpe)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including special tokens (default: 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="drop merges/words seen fewer times (default: 2)")
    p.add_argument("--lowercase", action="store_true", help="lower-case text before tokenizing")
    p.add_argument(
        "--byte-fallback",
        action="store_true",
        help="unigram: 256 byte tokens (in --vocab-size) spell characters no piece covers, so none is unknown (SentencePiece's option)",
    )
    p.add_argument("--sentinels", type=int, default=100, help="number of T5 sentinel tokens <extra_id_N> (default: 100)")
    p.add_argument("--no-chat-tokens", action="store_true", help="leave out the chat role tokens <|system|> <|user|> <|assistant|> <|end|>")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN", help="an extra special token (repeatable)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="documents held out, never seen by the tokenizer: the split `data prepare` makes with the same --val-fraction "
        "and --seed (default: 0.1; 0 trains on everything)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of that split (default: 1337, as data prepare)")
    p.add_argument("--out", default="runs/tokenizer", help="output folder (default: runs/tokenizer)")

    p = subcommand(
        tok_cmds,
        "encode",
        "print the token ids (or tokens) of a text",
        (
            "llmkit tokenizer encode --tokenizer runs/tok 'To be, or not to be'",
            "llmkit tokenizer encode --tokenizer smollm2 --tokens 'Hello, world!'",
            "echo 'some text' | llmkit tokenizer encode --tokenizer minilm",
        ),
        cmd_tokenizer_encode,
    )
    p.add_argument("text", nargs="?", help="the text (default: read standard input)")
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")
    p.add_argument("--tokens", action="store_true", help="print token strings beside the ids")
    p.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the tokenizer's own special tokens, as transformers does (BERT's [CLS] ... [SEP], Llama 3's bos); "
        "--no-add-special-tokens for the bare text (default: add)",
    )

    p = subcommand(
        tok_cmds,
        "decode",
        "turn token ids back into text",
        (
            "llmkit tokenizer decode --tokenizer runs/tok 412 77 1021",
            "llmkit tokenizer encode --tokenizer smollm2 'hi' | llmkit tokenizer decode --tokenizer smollm2",
        ),
        cmd_tokenizer_decode,
    )
    p.add_argument("ids", nargs="*", help="token ids (default: read them from standard input)")
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")
    p.add_argument("--skip-special-tokens", action="store_true", help="leave special tokens out of the text")

    p = subcommand(
        tok_cmds,
        "info",
        "describe a tokenizer: kind, vocabulary, special tokens, chat template",
        ("llmkit tokenizer info --tokenizer smollm2", "llmkit tokenizer info --tokenizer runs/tok"),
        cmd_tokenizer_info,
    )
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, tokenizer.json, GGUF file, 'smollm2' or 'minilm'")

    p = subcommand(
        tok_cmds,
        "compare",
        "train every kind on one corpus and compare them on held-out text",
        (
            "llmkit tokenizer compare --source shakespeare",
            "llmkit tokenizer compare --source shakespeare --vocab-size 4096 --kinds bpe,byte-bpe --json cmp.json --png cmp.png",
        ),
        cmd_tokenizer_compare,
    )
    source_options(p)
    p.add_argument("--kinds", default="word,char,bpe,wordpiece,byte-bpe,unigram", help="comma-separated kinds (default: all six)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of each kind (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for measuring (default: 0.1)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--png", metavar="FILE", help="bar chart (default: next to --json, else tokenizer_compare.png)")
    p.add_argument("--save-dir", metavar="DIR", help="save every trained tokenizer in DIR/KIND/")


def cmd_tokenizer_train(args) -> None:
    from llmkit.data.clean import normalize
    from llmkit.tokenizer import SpecialTokens, train_tokenizer

    source = args.source or ["shakespeare"]
    if args.val_fraction > 0:  # the documents `data prepare` will hold out, held out here too
        from llmkit.data.prepare import split_corpus

        texts = split_corpus(source, val_fraction=args.val_fraction, seed=args.seed, field=args.field, log=lambda m: None).train
    else:
        texts = [normalize(t) for t in read_corpus(args).texts]
    special = SpecialTokens(chat=not args.no_chat_tokens, sentinels=args.sentinels, extra=list(args.special))
    tok = train_tokenizer(
        texts,
        args.kind,
        args.vocab_size,
        min_frequency=args.min_frequency,
        lowercase=args.lowercase,
        special=special,
        show_progress=sys.stderr.isatty(),
        byte_fallback=args.byte_fallback,
    )
    tok.info.update(source=source, val_fraction=args.val_fraction, seed=args.seed)
    out = tok.save(args.out)
    print(
        f"trained a {args.kind} tokenizer with {tok.vocab_size:,} tokens in {tok.info['train_seconds']:.1f}s on "
        f"{len(texts)} training documents -> {out / 'tokenizer.json'}"
    )


def cmd_tokenizer_encode(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=args.add_special_tokens)
    if args.tokens:
        for i in ids:
            print(f"{i}\t{tok.backend.id_to_token(i)!r}")
    else:
        print(" ".join(map(str, ids)))


def cmd_tokenizer_decode(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError:
        raise LlmkitError("token ids must be whole numbers", "pass ids like `412 77 1021`") from None
    sys.stdout.write(tok.decode(ids, skip_special_tokens=args.skip_special_tokens) + "\n")


def cmd_tokenizer_info(args) -> None:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(f"kind         {tok.kind}")
    print(f"vocabulary   {tok.vocab_size:,}")
    for role, token in tok.special.items():
        print(f"{role:<12} {token!r} = {tok.token_id(role)}")
    print(f"sentinels    {len(tok.sentinel_ids)}")
    print(f"fingerprint  {tok.fingerprint()}")
    print(f"chat template {'yes' if tok.chat_template else 'no'}")


def cmd_tokenizer_compare(args) -> None:
    from llmkit import io
    from llmkit.data.clean import normalize
    from llmkit.evaluate.tokenizers import compare, plot, print_table
    from llmkit.tokenizer.train import KINDS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise LlmkitError(f"unknown tokenizer kind(s): {', '.join(bad)}", f"use some of: {', '.join(KINDS)}")
    corpus = read_corpus(args)
    con = console()
    rows = compare(
        [normalize(t) for t in corpus.texts],
        kinds,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        save_dir=args.save_dir,
        log=lambda m: con.print(f"[dim]{m}[/]"),
    )
    print_table(rows, con)
    if args.json:
        io.write_json(args.json, {"source": args.source or ["shakespeare"], "vocab_size": args.vocab_size, "rows": rows})
        print(f"table -> {args.json}")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else "tokenizer_compare.png")
    plot(rows, png)
    print(f"chart -> {png}")
