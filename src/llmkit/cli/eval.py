"""`llmkit eval`: perplexity, metrics, benchmark tasks (lm-evaluation-harness), GLUE/SuperGLUE, reports."""

from __future__ import annotations

import json

from llmkit.cli.common import group, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    ev_cmds = group(commands, "eval", "evaluate models",
                    ("llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
                     "llmkit eval metrics --metric bleu,chrf,rouge,meteor --predictions preds.txt --references refs.txt",
                     "llmkit eval tasks --model smollm2 --tasks shakespeare_cloze,arithmetic --shots 0,5 --out runs/eval",
                     "llmkit eval report --runs runs/eval runs/eval-sft"), "eval commands")
    p = subcommand(ev_cmds, "perplexity", "perplexity and bits per byte of a decoder on a text",
             ("llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
              "llmkit eval perplexity --model runs/pretrain --file shakespeare:hamlet --window 128 --stride 64 --json"), cmd_eval_perplexity)
    p.add_argument("--model", default="smollm2", help="a decoder: run folder, Hugging Face folder, GGUF, smollm2")
    p.add_argument("--file", default=None, help="the text: a file, or any --source form (e.g. shakespeare:hamlet) (required)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="start a window every S tokens (default: the window, no overlap)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_eval_perplexity(args) -> None:
    import llmkit
    from llmkit.evaluate.perplexity import evaluate_text

    if not args.file:
        raise LlmkitError("`llmkit eval perplexity` needs --file", "e.g. --file hamlet.txt or --file shakespeare:hamlet")
    model = llmkit.load(args.model)
    if model.config.family != "decoder":
        raise LlmkitError(f"perplexity needs a decoder; {args.model} is a {model.config.family}", "use a decoder model")
    if model.tokenizer is None:
        raise LlmkitError(f"{args.model} has no tokenizer", "use a model folder with tokenizer.json")
    if args.window > model.config.max_seq_len:
        raise LlmkitError(f"window {args.window} is longer than the model's context of {model.config.max_seq_len}",
                          f"use --window {model.config.max_seq_len} or less")
    from llmkit.data.sources import read_source

    text = "\n\n".join(read_source(args.file).texts)
    scores = evaluate_text(model, model.tokenizer, text, args.window, args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens)
    out = {"model": args.model, "file": args.file, "window": args.window, "stride": args.stride or args.window, **scores}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['tokens']:,} tokens scored: {out['nats_per_token']:.4f} nats/token, perplexity {out['perplexity']:.3f}, "
              f"{out['bits_per_byte']:.4f} bits per byte")


