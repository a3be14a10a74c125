"""`llmkit generate` and `llmkit chat`: continue prompts for scripts, talk with a model in the terminal."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llmkit import io
from llmkit.cli.common import console, decode_weight_options, subcommand
from llmkit.errors import LlmkitError

PRESET_NAMES = ("assistant", "summarize", "translate", "explain", "write", "sentiment")  # llmkit.applications.PRESETS


def register(commands) -> None:
    p = subcommand(
        commands,
        "generate",
        "continue prompts, or answer them through the chat template (--chat)",
        (
            "llmkit generate --model smollm2 --prompt 'Once upon a time' --max-new-tokens 50",
            "llmkit generate --model smollm2 --chat --greedy --prompt 'What is the capital of France?'",
            "llmkit generate --model runs/pretrain --prompt 'ROMEO:' --temperature 0.8 --top-k 50 --seed 1",
            "echo 'To be, or not to be' | llmkit generate --model smollm2 --json",
            "llmkit generate --model smollm2 --prompts-file prompts.jsonl --field prompt --json",
            "llmkit generate --task summarize --file text.txt",
            "llmkit generate --task translate --to fr --prompt 'The weather is lovely today.'",
            "llmkit generate --task write --kind email --prompt 'thank the team for the launch'",
            "llmkit generate --chat --json-schema city.json --prompt 'The capital of France, as JSON'",
        ),
        cmd_generate,
    )
    generation_options(p)
    p.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="answer with a JSON document of this JSON schema (constrained decoding: the output always parses; "
        'a file holding {} or {"type": "object"} asks for any JSON object)',
    )
    p.add_argument("--prompt", default=None, help="the prompt (default: standard input, one prompt)")
    p.add_argument("--prompts-file", default=None, help="a JSONL file of prompts (field --field), generated in batches")
    p.add_argument("--field", default="prompt", help="the prompt field of --prompts-file rows (default: prompt)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines: prompt, new token ids, new text, finish reason, and the batch's prompt_tokens_per_s and "
        "decode_tokens_per_s",
    )
    p.add_argument(
        "--task",
        default=None,
        choices=list(PRESET_NAMES),
        help="an application preset through the chat template (the web page's Applications): its system and user template around the text",
    )
    p.add_argument("--file", default=None, help="read the text (the prompt) from this file")
    p.add_argument("--to", default=None, help="--task translate: the target language (fr, de, es, ... or a name; default fr)")
    p.add_argument("--kind", default=None, help="--task write: story, email or product (default story)")

    p = subcommand(
        commands,
        "chat",
        "talk with a model in the terminal; answers stream",
        (
            "llmkit chat",
            "llmkit chat --model smollm2 --system 'You are a pirate.' --temperature 0.7 --quantize int8",
            "llmkit chat --model runs/sft --greedy",
        ),
        cmd_chat,
    )
    generation_options(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="the system message")


def cmd_generate(args) -> None:
    from llmkit.chat import chat_prompt_ids
    from llmkit.generate import generate, stream

    if args.task:
        from llmkit.applications import PRESETS, render

        if args.prompts_file:
            raise LlmkitError("--task takes one text", "give it with --prompt, --file or standard input")
        if args.max_new_tokens is None:
            args.max_new_tokens = PRESETS[args.task]["max_tokens"]
    elif args.to or args.kind:
        raise LlmkitError("--to and --kind go with --task", "add --task translate or --task write")
    if args.file:
        if args.prompt is not None or args.prompts_file:
            raise LlmkitError("--file is the prompt: give it, --prompt or --prompts-file, not several", "keep one of them")
        from llmkit.data.sources import read_text

        if not Path(args.file).is_file():
            raise LlmkitError(f"{args.file} does not exist", "check the path given to --file")
        args.prompt, bad = read_text(Path(args.file))
        if bad:
            console().print(f"[yellow]warning: {args.file} has {bad} bytes that are not UTF-8; they read as U+FFFD[/]")
    cfg = generation_config(args)
    if args.json_schema:
        cfg.json_schema = read_schema(args.json_schema)
    if args.prompts_file:
        numbered = io.parse_jsonl(Path(args.prompts_file).read_text(encoding="utf-8"), args.prompts_file)
        rows = [r for _, r in numbered]
        missing = [n for n, r in numbered if not isinstance(r, dict) or args.field not in r]
        if missing:
            raise LlmkitError(
                f"{args.prompts_file}: line {missing[0]} has no field {args.field!r}", "pass --field with the prompt field's name"
            )
        prompts = [str(r[args.field]) for r in rows]
    else:
        prompts = [args.prompt if args.prompt is not None else sys.stdin.read()]
    if any(not p.strip() for p in prompts):
        raise LlmkitError("a prompt is empty", "give every prompt some text")
    model = load_for_generation(args.model, args.dtype, args.quantize, not args.no_compile, device=args.device)
    tok = model.tokenizer
    if args.task:
        messages = render(args.task, prompts[0], to=args.to, kind=args.kind)
        if args.system:
            messages[0]["content"] = args.system
        prompts = [chat_prompt_ids(tok, messages)]
    elif args.chat:
        prompts = [
            chat_prompt_ids(tok, ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}])
            for p in prompts
        ]
    notes: list[str] = []  # notes about the run (decoding without compiling) wait for the end: never inside the answer

    def warn(message: str) -> None:
        if message.startswith("note:"):
            notes.append(message)
        else:
            console().print(f"[yellow]{message}[/]")  # the console writes to stderr

    if len(prompts) == 1 and not args.json and model.config.family == "decoder":
        for piece in stream(model, tok, prompts[0], cfg, warn=warn):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_notes(notes)
        return
    for i in range(0, len(prompts), args.batch_size):
        stats: dict = {}  # the batch's speeds (decoders), in every --json row of the batch
        for g in generate(model, tok, prompts[i : i + args.batch_size], cfg, warn=warn, stats=stats):
            if args.json:
                row = {"prompt": tok.decode(g.prompt_ids), "ids": g.ids, "text": g.text, "finish_reason": g.finish_reason}
                for key in ("prompt_tokens_per_s", "decode_tokens_per_s"):
                    if key in stats:
                        row[key] = round(stats[key], 2)
                print(json.dumps(row, ensure_ascii=False))
            else:
                print(g.text)
    _print_notes(notes)


def _print_notes(notes: list[str]) -> None:
    """The run's notes (on stderr), after the whole answer is out on stdout."""
    sys.stdout.flush()
    for note in notes:
        console().print(f"[dim]{note}[/]", soft_wrap=True)


def cmd_chat(args) -> None:
    from llmkit.chat import ChatSession

    model = load_for_generation(args.model, args.dtype, args.quantize, not args.no_compile, device=args.device)
    con = console()
    notes: list[str] = []  # the run's notes (the background compile's, eager decoding), shown before the next prompt

    def warn(message: str) -> None:  # never inside an answer: a note waits for the next prompt
        if message.startswith("note:"):
            notes.append(message[len("note:") :].strip())
        else:
            con.print(f"[yellow]{message}[/]")

    session = ChatSession(model, model.tokenizer, system=args.system, config=generation_config(args), warn=warn)
    con.print(f"[bold]chatting with {args.model}[/] — /reset, /system TEXT, /save FILE, /exit; Ctrl-C stops an answer")
    job = None
    if getattr(model, "compiled_decode", False) == "auto" and sys.stdin.isatty():  # a conversation: compile while the user types
        from llmkit.model.compiled import compile_estimate, compile_step

        seconds, cached = compile_estimate(model, 1)
        what = "the compiled decode step is in inductor's cache" if cached else "compiling the decode step for this machine, once"
        con.print(f"[dim]({what}: a background process builds it, ~{seconds:.0f} s; answers decode eagerly until then)[/]")
        # built in the background, loaded here between two turns (seconds): never during an answer, never left half-loaded
        job = compile_step(model, 1, background="process", hold=True, log=lambda m: notes.append(m) if "did not" in m else None)
    while True:
        if job is not None and job.built.is_set() and not job.done.is_set():
            con.print("[dim](loading the compiled decode step into this process: a few seconds, once)[/]")
            job.load()
            if job.ready.is_set():
                con.print(f"[dim](answers now use the compiled decode step; loaded in {job.seconds:.0f} s)[/]")
        for note in notes:
            con.print(f"[dim]({note})[/]")
        notes.clear()
        try:
            line = input("you> ")
        except EOFError:
            print()
            for note in notes:
                con.print(f"[dim]({note})[/]")
            return
        except KeyboardInterrupt:
            print("\n(type /exit or press Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            con.print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip() or None
            con.print(f"(system message {'set' if session.system else 'removed'})")
            continue
        if text.startswith("/save"):
            path = text[len("/save") :].strip() or "chat.json"
            session.save(path)
            con.print(f"(saved to {path})")
            continue
        if text.startswith("/"):
            con.print("(commands: /reset, /system TEXT, /save FILE, /exit)")
            continue
        sys.stdout.write("assistant> ")
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except LlmkitError as e:
            con.print(f"[red]{e.message}[/] — {e.fix}")
        sys.stdout.write("\n")


# --- shared with other commands that generate (serve) ---------------------------------------------


def generation_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--model", default="smollm2", help="a decoder or encoder-decoder: run folder, Hugging Face folder, GGUF, smollm2")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"most tokens to generate (default: {max_new_tokens})")
    p.set_defaults(_max_new_tokens=max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.9, help="sample among the tokens holding this much probability (default: 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens already seen (1.0: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (encoder-decoders)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--truncate", action="store_true", help="cut a prompt that does not fit the context instead of refusing it")
    decode_weight_options(p)
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="never compile the decode step; by default a decoder's one-token step is compiled with torch.compile where it "
        "pays: in the background for chat, for generate only when the tokens to come save more than the compile costs "
        "(minutes the first time, seconds from inductor's cache on disk; LLMKIT_COMPILE=0 also turns it off)",
    )


def read_schema(path: str) -> dict:
    """The JSON schema in the file `path`, checked (llguidance compiles it), or an error naming what is wrong."""
    from llmkit.grammar import check_schema

    file = Path(path)
    if not file.is_file():
        raise LlmkitError(f"{path} does not exist", 'give --json-schema a JSON file holding a schema, e.g. {"type": "object"}')
    try:
        schema = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmkitError(f"{path} is not JSON ({e})", "write the schema as a JSON object") from None
    return check_schema({"type": "object"} if schema == {} else schema)  # {}: any JSON object, as --help says


def generation_config(args):
    from llmkit.generate import GenerationConfig

    default = args.max_new_tokens is None  # the default is cut to what the context holds; a number asked for is not
    if default:
        args.max_new_tokens = args._max_new_tokens
    cfg = GenerationConfig(
        fit_new_tokens=default,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=[unescape(s) for s in args.stop],
        seed=args.seed,
        truncate=args.truncate,
        num_beams=args.num_beams,
    )
    cfg.check()  # before the model loads: a bad value fails in a second, not after it
    return cfg


def load_for_generation(name: str, dtype: str = "auto", quantize: str | None = "auto", compile: bool = True, device: str | None = "auto"):
    """The model for generate/chat on `device` in `dtype` (auto: the device's), quantized as asked (auto: a GGUF's own
    blocks for the compiled step on a CPU) and with the compiled decode step where it pays unless `compile` is False or
    LLMKIT_COMPILE=0."""
    import torch

    import llmkit
    from llmkit.model.compiled import prepare_for_decoding
    from llmkit.threads import busy_note

    model = llmkit.load(name, dtype=dtype, device=device)
    prepare_for_decoding(model, quantize, compile)
    note = busy_note(torch.get_num_threads()) if next(model.parameters()).device.type == "cpu" else None
    if note:
        print(note, file=sys.stderr)
    if model.config.family == "encoder":
        raise LlmkitError(f"{name} is an encoder; it does not generate text", "use a decoder or an encoder-decoder model")
    if model.tokenizer is None:
        raise LlmkitError(f"{name} has no tokenizer", "use a model folder with tokenizer.json")
    return model


ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r", "\\\\": "\\"}


def unescape(text: str) -> str:
    """`--stop "\\n\\n"` as typed in a shell (a backslash and an n, twice) means two newlines, as llama.cpp reads its
    prompts and reverse prompts: \\n, \\t, \\r and \\\\ are turned into what they name; nothing else changes."""
    return re.sub(r"\\[ntr\\]", lambda m: ESCAPES[m.group(0)], text)
