"""The `llmkit` command: one subcommand per stage of a language model's life, one module per command group.

    tokenizer.py   llmkit tokenizer train | encode | decode | info | compare
    data.py        llmkit data prepare | info
    model.py       llmkit model info | export, llmkit attention
    pretrain.py    llmkit pretrain
    eval.py        llmkit eval perplexity | metrics | tasks | glue | report
    embed.py       llmkit embed train | text | tokens | similar | analogy | similarity | odd-one-out | cluster | map |
                   evaluate | index | search
    finetune.py    llmkit finetune, llmkit finetune compare
    generate.py    llmkit generate, llmkit chat
    serve.py       llmkit serve (the OpenAI-compatible HTTP API)
    demo.py        llmkit demo

Every subcommand takes `--config FILE` (YAML or JSON): its keys are the option names (dashes or underscores), and
options given on the command line win over the file. Errors print one line (what is wrong, how to fix it) and exit 1;
`--debug` shows the traceback. A command module parses options and calls the library: the work lives in the library.
"""

from __future__ import annotations

import argparse
import sys

from llmkit import __version__
from llmkit.cli import data, demo, embed, finetune, generate, model, pretrain, serve, tokenizer
from llmkit.cli import eval as eval_
from llmkit.cli.common import load_config
from llmkit.errors import LlmkitError

LIFECYCLE = """\
the lifecycle:
  tokenizer   train, inspect and compare tokenizers (word, char, bpe, wordpiece, byte-bpe, unigram)
  data        turn a corpus into token shards (clean, de-duplicate, split, tokenize)
  model       presets, parameter counts and FLOPs, export to Hugging Face format
  pretrain    train a decoder (causal LM), encoder (masked LM) or encoder-decoder (span corruption) from scratch
  finetune    fine-tune (full, LoRA, adapters) on a task or your data; `finetune compare` sets methods side by side
  eval        evaluate: perplexity, metrics (BLEU, ROUGE, F1, ...), benchmark tasks, GLUE/SuperGLUE, reports
  embed       word vectors (Word2Vec, GloVe) and text vectors: similarity, analogies, maps, semantic search
  generate    continue prompts (or answer them through the chat template), for scripts
  chat        talk with a model in the terminal (SmolLM2-135M-Instruct by default), streaming
  serve       serve models over the OpenAI HTTP API: chat, completions, embeddings, batched
  attention   draw a model's attention maps for a sentence (layers x heads)
  demo        run every stage end to end on the embedded defaults

run `llmkit COMMAND --help` for a command's options and examples.
"""

MODULES = (tokenizer, data, model, pretrain, finetune, eval_, embed, generate, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkit",
        description="llmkit: train, fine-tune, evaluate and use language models.",
        epilog=LIFECYCLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in MODULES:
        module.register(commands)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options in the order they win: the command line, then --config FILE, then (with --resume) the options the run in
    --out was started with, then the defaults."""
    argv = list(argv)
    for i, a in enumerate(argv[:-1]):  # `llmkit finetune compare ...` is the finetune-compare command (pairs: finetune-pairs)
        if a == "finetune" and argv[i + 1] in ("compare", "pairs"):
            argv[i : i + 2] = [f"finetune-{argv[i + 1]}"]
            break
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(args, extra)
    config: dict = {}
    if getattr(args, "config", None):
        sub: argparse.ArgumentParser = args._parser
        config = load_config(args.config)
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise LlmkitError(
                f"config file {args.config} has unknown option(s): {', '.join(unknown)}",
                f"use option names of `{sub.prog} --help`",
            )
        for key in ("source", "special"):  # append options: a config value replaces the default list
            if key in config and isinstance(config[key], str):
                config[key] = [config[key]]
        sub.set_defaults(**config)
        args = parser.parse_args(argv)
    if getattr(args, "resume", False):
        own = _started_with(args)
        if own:
            args._parser.set_defaults(**{**own, **config})
            args = parser.parse_args(argv)
    return args


RUN_CONFIGS = {"llmkit pretrain": "train_config.json", "llmkit finetune": "finetune_config.json"}
NOT_RESUMED = {"resume", "out", "config", "budget", "device"}  # the budget: the recipe's rule (a finished run says so)


def _started_with(args: argparse.Namespace) -> dict:
    """The options a run was started with, from its folder's config (as option names): `llmkit finetune --out runs/x
    --resume` continues runs/x as it was started, not with today's defaults."""
    import json
    from pathlib import Path

    name = RUN_CONFIGS.get(args._parser.prog)
    path = Path(str(getattr(args, "out", ""))) / name if name else None
    if path is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the recipe refuses a damaged run folder with its own message
    if isinstance(saved.get("model_options"), dict):  # pretraining's --model-option KEY=VALUE
        saved["model_option"] = [f"{k}={json.dumps(v)}" for k, v in saved["model_options"].items()]
    # an on/off flag (--fsdp, --checkpointing, --no-samples) has no form that turns it off again: it comes back only
    # where the checkpoint needs it (fine-tuning's options a resume must keep, --rslora say), else it is the user's now
    keep = set()
    if args._parser.prog == "llmkit finetune":
        from llmkit.finetune.recipe import RESUME_KEYS

        keep = set(RESUME_KEYS)
    flags = {a.dest for a in args._parser._actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))}
    known = {a.dest for a in args._parser._actions} - (flags - keep)
    return {k: v for k, v in saved.items() if k in known and k not in NOT_RESUMED}


def _refuse_unknown(args: argparse.Namespace, extra: list[str]) -> None:
    """Options the command does not have: named, with the closest it does have (a typo such as --bugdet)."""
    import difflib

    sub = getattr(args, "_parser", None)
    command = sub.prog if sub is not None else "llmkit"
    options = [o for a in (sub._actions if sub is not None else []) for o in a.option_strings if o.startswith("--")]
    first = extra[0]
    close = difflib.get_close_matches(first.split("=")[0], options, n=1, cutoff=0.6) if first.startswith("-") else []
    hint = f"did you mean {close[0]}? " if close else ""
    raise LlmkitError(f"`{command}` has no option or argument {first!r}", f"{hint}`{command} --help` lists what it takes")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parse_args(argv)
        if getattr(args, "_handler", None) is None:
            (getattr(args, "_parser", None) or build_parser()).print_help()
            return 0 if not argv or argv == ["--debug"] else 2
        if getattr(args, "device", None) not in (None, "auto", "cpu"):  # a device that is not there: refused before any load
            from llmkit.devices import resolve

            resolve(args.device)
        args._handler(args)
        return 0
    except LlmkitError as e:
        if debug:
            raise
        print(f"llmkit: error: {e.message}" + (f" — fix: {e.fix}" if e.fix else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, or an error from a library we did not anticipate
        if debug:
            raise
        print(f"llmkit: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main", "parse_args"]
