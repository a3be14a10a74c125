"""Pieces every command module shares: subcommand registration with examples, source and generation options,
config files, the console. A command module parses options and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmkit.errors import LlmkitError


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def subcommand(subparsers, name: str, help: str, example_lines: tuple[str, ...], handler) -> argparse.ArgumentParser:
    """A subcommand with its examples in --help and --config FILE; `handler(args)` runs it."""
    p = subparsers.add_parser(
        name, help=help, description=help, epilog=examples(*example_lines), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", metavar="FILE", help="read options from a YAML or JSON file (command-line options win)")
    p.set_defaults(_handler=handler, _parser=p)
    return p


def group(commands, name: str, help: str, example_lines: tuple[str, ...], title: str):
    """A command group (`llmkit tokenizer ...`): returns the subparsers to add its actions to."""
    g = commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=examples(*example_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.set_defaults(_parser=g, _handler=None)
    return g.add_subparsers(title=title, metavar="ACTION")


def console():
    from llmkit.progress import console

    return console


def source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        action="append",
        default=None,
        metavar="SRC",
        help="'shakespeare' (or shakespeare:PLAY, shakespeare/GENRE), a .txt/.md/.jsonl file, a folder or a glob; repeatable",
    )
    p.add_argument("--field", default="text", help="the text field of JSONL rows (default: text)")


def read_corpus(args):
    from llmkit.data.sources import read_source

    corpus = read_source(args.source or ["shakespeare"], field=args.field)
    for w in corpus.warnings:
        console().print(f"[yellow]warning:[/] {w}")
    return corpus


def index_list(spec: str | None) -> list[int] | None:
    """'0,2,5' or '0-3' -> a list of indices (None stays None)."""
    if spec is None:
        return None
    out = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise LlmkitError(f"cannot read the list {spec!r}", "write it like '0,2,5' or '0-3'") from None
    return out


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def load_config(path: str) -> dict:
    """A --config file's options (YAML or JSON), keys with dashes or underscores."""
    file = Path(path)
    if not file.exists():
        raise LlmkitError(f"config file {path} does not exist", "check the path given to --config")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise LlmkitError(f"config file {path} does not parse ({str(e).splitlines()[0]})", "fix its YAML/JSON syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlmkitError(f"config file {path} must hold a mapping of option: value", "write it as `option: value` lines")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


QUANTIZE_CHOICES = ["auto", "none", "gguf", "int8", "int4"]
QUANTIZE_HELP = (
    "auto (default): a GGUF's own Q4_0/Q4_1/Q8_0 blocks, read by the compiled decode step on a CPU: the same float32 "
    "weights as none, in fewer bytes (the embedded SmolLM2); the weights as loaded otherwise. int8 / int4 round the "
    "weights for speed (int4: groups of 32 with bf16 activations, the head int8 x int8): answers may differ (opt-in)"
)


DEVICE_HELP = "where the model runs: auto (default: a CUDA GPU, then Apple's mps, then the CPU), cpu, cuda, cuda:N or mps"


def device_option(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """--device of every command that runs a model (one definition: the same words and choices everywhere)."""
    p.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)


def decode_weight_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --quantize of every command that decodes with a model (generate, chat, serve)."""
    device_option(p)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights and activations (default auto: the device's, float32 on a CPU, bf16 on GPUs that have it, else fp16)",
    )
    p.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
