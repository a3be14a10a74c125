"""`llmkit eval`: perplexity, metrics, benchmark tasks (lm-evaluation-harness), GLUE/SuperGLUE, reports."""

from __future__ import annotations

import json
import sys

from llmkit.cli.common import console, device_option, group, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    ev_cmds = group(
        commands,
        "eval",
        "evaluate models",
        (
            "llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
            "llmkit eval metrics --metric bleu,chrf,rouge,meteor --predictions preds.txt --references refs.txt",
            "llmkit eval tasks --model smollm2 --tasks shakespeare_cloze,arithmetic --shots 0,5 --out runs/eval",
            "llmkit eval report --runs runs/eval runs/eval-sft",
        ),
        "eval commands",
    )
    p = subcommand(
        ev_cmds,
        "perplexity",
        "perplexity and bits per byte of a decoder on a text",
        (
            "llmkit eval perplexity --model smollm2 --file hamlet.txt --window 512",
            "llmkit eval perplexity --model runs/pretrain --file shakespeare:hamlet --window 128 --stride 64 --json",
        ),
        cmd_eval_perplexity,
    )
    p.add_argument("--model", default="smollm2", help="a decoder: run folder, Hugging Face folder, GGUF, smollm2")
    p.add_argument("--file", default=None, help="the text: a file, or any --source form (e.g. shakespeare:hamlet) (required)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="start a window every S tokens (default: the window, no overlap)")
    p.add_argument("--batch-size", type=int, default=4)
    device_option(p)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument(
        "--prefix-token",
        default="none",
        choices=["none", "bos", "eos"],
        help="a token before the text, so that its first token is scored too (lm-eval's rolling log-likelihood: bos)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = subcommand(
        ev_cmds,
        "metrics",
        "classification, regression and generation metrics, with bootstrap intervals",
        (
            "llmkit eval metrics --metric bleu,chrf,rouge,meteor --predictions preds.txt --references refs.txt --json",
            "llmkit eval metrics --metric accuracy,f1,roc_auc,mcc --predictions preds.jsonl --bootstrap 1000 --json",
            "llmkit eval metrics --metric exact_match,token_f1 --predictions answers.jsonl --field answer",
            "llmkit eval metrics --metric pearson,spearman --predictions stsb.jsonl",
        ),
        cmd_eval_metrics,
    )
    p.add_argument(
        "--metric",
        default=None,
        help="comma list: accuracy, precision, recall, f1 (and _binary/_macro/_micro/_weighted), "
        "mcc, roc_auc, pr_auc, confusion, pearson, spearman, bleu, chrf, chrf++, ter, rouge (rouge1/2/L/Lsum), "
        "meteor, exact_match, token_f1 (required)",
    )
    p.add_argument(
        "--predictions",
        default=None,
        help="a .txt file (one prediction per line) or .jsonl (required); classification "
        "and regression: JSONL rows with label, prediction and (for roc_auc, pr_auc) score",
    )
    p.add_argument(
        "--references",
        action="append",
        default=None,
        metavar="FILE",
        help="references in the same layout, one per prediction; repeat for several references per prediction",
    )
    p.add_argument("--field", default="text", help="the text field of JSONL predictions and references (default: text)")
    p.add_argument("--pos-label", default=None, help="the positive class of binary metrics (default: 1, true, positive or the last label)")
    p.add_argument(
        "--classes",
        default=None,
        help="comma list: the classes in the order of the score columns (default: the labels sorted, numbers numerically)",
    )
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="a 95%% interval from N resamples (e.g. 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--png", default=None, help="with the confusion metric: also draw the matrix into this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object, a key per metric")

    p = subcommand(
        ev_cmds,
        "tasks",
        "benchmark tasks through lm-evaluation-harness: built-in offline tasks or your task YAML",
        (
            "llmkit eval tasks --model smollm2 --tasks shakespeare_cloze,play,arithmetic --shots 0,5 --out runs/eval",
            "llmkit eval tasks --model runs/sft --tasks my_tasks/ --out runs/eval-sft",
            "llmkit eval tasks --model smollm2 --tasks my_task --include-path my_tasks --limit 50 --json",
        ),
        cmd_eval_tasks,
    )
    p.add_argument("--model", default="smollm2", help="a decoder or encoder-decoder llmkit.load accepts (default: smollm2)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list of built-in tasks (shakespeare_cloze, play, arithmetic, reverse, sort, "
        "dates), lm-eval task names found in --include-path, or folders of task YAML (required)",
    )
    p.add_argument("--shots", default="0", help="comma list of few-shot counts, one evaluation each (default: 0)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR", help="a folder of lm-eval task YAML (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="score only the first N examples of each task (or a fraction < 1)")
    p.add_argument("--chat", action="store_true", help="render prompts through the model's chat template")
    p.add_argument("--batch-size", type=int, default=8)
    device_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in data and of few-shot sampling (default: 0)")
    p.add_argument("--out", default="runs/eval", help="output folder: results.json, tasks/, cache/ (default: runs/eval)")
    p.add_argument("--json", action="store_true", help="print lm-eval's results object (for several --shots, one per count)")

    p = subcommand(
        ev_cmds,
        "glue",
        "GLUE / SuperGLUE from their official files, with their official metrics",
        (
            "llmkit eval glue --task sst2 --data glue_data/SST-2 --model runs/minilm-sst2",
            "llmkit eval glue --task cola,sst2,mrpc,rte --data glue_data --model smollm2 --shots 5",
            "llmkit eval glue --task boolq,cb,copa --data superglue_data --model smollm2 --json",
        ),
        cmd_eval_glue,
    )
    p.add_argument(
        "--task",
        default=None,
        help="comma list: cola, sst2, mrpc, qqp, stsb, mnli-m, mnli-mm, qnli, rte, wnli, boolq, cb, "
        "copa, multirc, record, rte-superglue, wic, wsc, axb, axg (required)",
    )
    p.add_argument("--data", default=None, help="a task's official folder (glue_data/SST-2), or the folder of task folders (required)")
    p.add_argument("--model", default="smollm2", help="a classifier run of `llmkit finetune` (encoders), or a decoder (zero/few-shot)")
    p.add_argument("--shots", type=int, default=0, help="decoders: solved training examples before each question (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N validation examples (questions) of each task")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot examples")
    p.add_argument("--batch-size", type=int, default=8)
    device_option(p)
    p.add_argument("--out", default=None, help="also write OUT/results.json (for `llmkit eval report`)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = subcommand(
        ev_cmds,
        "report",
        "several models' evaluations side by side: markdown table, JSON and a bar chart",
        ("llmkit eval report --runs runs/eval runs/eval-sft", "llmkit eval report --runs runs/eval* --out runs/report.md"),
        cmd_eval_report,
    )
    p.add_argument("--runs", nargs="+", default=None, help="folders written by `llmkit eval tasks` or `eval glue --out` (required)")
    p.add_argument("--out", default="report.md", help="the markdown file; .json and .png beside it (default: report.md)")

    p = subcommand(
        ev_cmds,
        "arena",
        "the human-vote leaderboard: Elo and Bradley-Terry ratings with bootstrap intervals, ratings",
        (
            "llmkit eval arena --db runs/votes.db",
            "llmkit eval arena --db runs/votes.db --json --png ratings.png",
            "llmkit eval arena --db runs/votes.db --export votes.jsonl",
        ),
        cmd_eval_arena,
    )
    p.add_argument("--db", default="runs/votes.db", help="the votes database `llmkit serve --db` wrote (default: runs/votes.db)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="resamples for the 95%% intervals (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--json", action="store_true", help="print the leaderboard as JSON")
    p.add_argument("--png", default=None, help="draw the ratings with their intervals into this PNG")
    p.add_argument("--export", default=None, help="write every vote and rating to this JSONL file")
    p.add_argument(
        "--export-pairs",
        default=None,
        metavar="FILE",
        help="write each decided battle as a preference pair (prompt, chosen, rejected: trl's layout) for finetune --method dpo",
    )
    p.add_argument(
        "--export-kto",
        default=None,
        metavar="FILE",
        help="write the ratings as prompt/completion/label rows (4-5 good, 1-2 bad: KTO's layout)",
    )

    p = subcommand(
        ev_cmds,
        "ab",
        "an A/B test between two models (or two settings) from arena votes",
        ("llmkit eval ab --db runs/votes.db --a smollm2 --b sft", "llmkit eval ab --db runs/votes.db --a hot --b cold --ties half --json"),
        cmd_eval_ab,
    )
    p.add_argument("--db", default="runs/votes.db", help="the votes database (default: runs/votes.db)")
    p.add_argument("--a", required=False, default=None, help="model A's served name (required)")
    p.add_argument("--b", required=False, default=None, help="model B's served name (required)")
    p.add_argument(
        "--ties",
        default="exclude",
        choices=["exclude", "half", "a", "b"],
        help="how ties (and both-bad votes) count: left out (the sign test; default), split half and half, or won by a side",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--export", default=None, help="write every vote and rating to this JSONL file")


def cmd_eval_perplexity(args) -> None:
    import llmkit
    from llmkit.evaluate.perplexity import evaluate_text

    if not args.file:
        raise LlmkitError("`llmkit eval perplexity` needs --file", "e.g. --file hamlet.txt or --file shakespeare:hamlet")
    model = llmkit.load(args.model, device=args.device)
    if model.config.family != "decoder":
        raise LlmkitError(f"perplexity needs a decoder; {args.model} is a {model.config.family}", "use a decoder model")
    if model.tokenizer is None:
        raise LlmkitError(f"{args.model} has no tokenizer", "use a model folder with tokenizer.json")
    if args.window > model.config.max_seq_len:
        raise LlmkitError(
            f"window {args.window} is longer than the model's context of {model.config.max_seq_len}",
            f"use --window {model.config.max_seq_len} or less",
        )
    from llmkit.data.sources import read_source

    text = "\n\n".join(read_source(args.file).texts)
    prefix = {"none": None, "bos": model.tokenizer.bos_id, "eos": model.tokenizer.eos_id}[args.prefix_token]
    if args.prefix_token != "none" and prefix is None:
        raise LlmkitError(f"the tokenizer has no {args.prefix_token} token", "use --prefix-token with a token it has, or none")
    scores = evaluate_text(
        model, model.tokenizer, text, args.window, args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens, prefix_id=prefix
    )
    out = {"model": args.model, "file": args.file, "window": args.window, "stride": args.stride or args.window, **scores}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{out['tokens']:,} tokens scored: {out['nats_per_token']:.4f} nats/token, perplexity {out['perplexity']:.3f}, "
            f"{out['bits_per_byte']:.4f} bits per byte"
        )


def cmd_eval_metrics(args) -> None:
    from llmkit.evaluate import metrics as M

    if not args.metric or not args.predictions:
        raise LlmkitError(
            "`llmkit eval metrics` needs --metric and --predictions", "e.g. --metric bleu,rouge --predictions p.txt --references r.txt"
        )
    names = M.expand([m.strip() for m in args.metric.split(",") if m.strip()])
    generation = {M.kind_of(m) for m in names} == {"generation"}
    ex = M.read_generation(args.predictions, args.references, args.field) if generation else M.read_labelled(args.predictions)
    if args.classes and not generation:
        seen = {M._show(M._key(v)): v for v in list(ex.labels) + list(ex.predictions)}  # "1" names the label 1
        ex.classes = [seen.get(c.strip(), c.strip()) for c in args.classes.split(",") if c.strip()]
    results = M.compute(names, ex, bootstrap_samples=args.bootstrap, seed=args.seed, pos_label=args.pos_label)
    for m in names:
        sig = M.signature(m, ex) if generation else None
        if sig:
            print(f"{m} signature: {sig}", file=sys.stderr)
    if "confusion" in results and args.png:  # a picture only when asked for: the matrix is printed (and in --json) anyway
        M.plot_confusion(results["confusion"], args.png)
        print(f"confusion matrix -> {args.png}", file=sys.stderr)
    if args.json:
        print(json.dumps(M.json_safe(results), ensure_ascii=False))
        return
    print(f"{len(ex)} examples")
    for m, v in results.items():
        if m == "confusion":
            width = max(len(label) for label in v["labels"]) + 2
            print("confusion (rows: label, columns: prediction)")
            print(" " * width + "".join(f"{label:>{width}}" for label in v["labels"]))
            for label, row in zip(v["labels"], v["matrix"]):
                print(f"{label:>{width}}" + "".join(f"{x:>{width}}" for x in row))
        elif isinstance(v, dict):
            print(f"{m:<12} {v['value']:.4f}  (95% interval {v['low']:.4f} - {v['high']:.4f})")
        else:
            print(f"{m:<12} {v:.4f}")


def cmd_eval_tasks(args) -> None:
    from llmkit.evaluate.tasks import run_tasks

    if not args.tasks:
        raise LlmkitError("`llmkit eval tasks` needs --tasks", "e.g. --tasks shakespeare_cloze,arithmetic, or a folder of task YAML")
    try:
        shots = [int(k) for k in args.shots.split(",") if k.strip()]
    except ValueError:
        raise LlmkitError(f"cannot read --shots {args.shots!r}", "write counts like 0,5") from None
    if args.limit is not None and args.limit <= 0:
        raise LlmkitError(
            f"--limit {args.limit:g} scores nothing", "give a count of examples (--limit 50) or a fraction (--limit 0.1), or leave it out"
        )
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    summary = run_tasks(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        shots=shots,
        out=args.out,
        limit=limit,
        include_path=args.include_path,
        chat=args.chat,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        log=lambda m: console().print(m),
    )
    if args.json:
        by_shots = {k: v["results"] for k, v in summary["shots"].items()}
        print(json.dumps(by_shots[str(shots[0])] if len(shots) == 1 else by_shots, default=str))
        return
    print_results_table(summary)
    print(f"results -> {args.out}/results.json")


def print_results_table(summary: dict) -> None:
    from rich.table import Table

    from llmkit.progress import print_table

    table = Table(title=f"{summary['model']}")
    for col in ("task", "shots", "metric", "value", "± stderr", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for k, block in summary["shots"].items():
        for task, metrics in block["results"].items():
            n = block["n-samples"].get(task, {}).get("effective", "")
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                err = metrics.get(key.replace(",", "_stderr,", 1))
                table.add_row(task, k, key, f"{value:.4f}", f"{err:.4f}" if isinstance(err, (int, float)) else "", str(n))
    print_table(table)


def cmd_eval_glue(args) -> None:
    from llmkit.evaluate.glue import run_glue

    if not args.task or not args.data:
        raise LlmkitError("`llmkit eval glue` needs --task and --data", "e.g. --task sst2 --data glue_data/SST-2")
    if args.limit is not None and args.limit <= 0:
        raise LlmkitError(f"--limit {args.limit} scores nothing", "give a count of questions (--limit 50), or leave it out")
    out = run_glue(
        args.model,
        [t.strip() for t in args.task.split(",") if t.strip()],
        args.data,
        shots=args.shots,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        log=lambda m: console().print(m),
    )
    if args.out:
        from llmkit import io

        io.write_json(f"{args.out}/results.json", out)
    if args.json:
        print(json.dumps(out))
        return
    for task, m in out["tasks"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("score", "n"))
        print(f"{task:<14} {values}  (score {m['score']:.1f}, n {m['n']})")
    if len(out["tasks"]) > 1:
        for suite, value in out["scores"].items():
            print(
                f"{'GLUE' if suite == 'glue' else 'SuperGLUE'} score: {value:.1f} (as the leaderboard counts it: the mean of "
                f"the task scores{', MNLI-m and -mm as one' if suite == 'glue' else ', diagnostics left out'})"
            )


def cmd_eval_report(args) -> None:
    from llmkit.evaluate.report import markdown, report

    if not args.runs:
        raise LlmkitError("`llmkit eval report` needs --runs", "e.g. --runs runs/eval runs/eval-sft")
    out = report(args.runs, args.out)
    print(markdown(out["rows"]), end="")
    from pathlib import Path

    print(f"report -> {args.out}, {Path(args.out).with_suffix('.json')}, {Path(args.out).with_suffix('.png')}")


def _export_preferences(store, args) -> None:
    """--export-pairs and --export-kto: the votes and ratings as training rows, with what was left out counted."""
    from llmkit import io
    from llmkit.evaluate.arena import kto_rows, preference_pairs

    rows = store.export()
    if args.export_pairs:
        pairs, left_out = preference_pairs(rows)
        io.write_jsonl(args.export_pairs, pairs)
        why = ", ".join(f"{n} {k}" for k, n in left_out.items() if n) or "none"
        console().print(f"{len(pairs)} preference pairs -> {args.export_pairs} (left out: {why})")
    if args.export_kto:
        kto, neutral = kto_rows(rows)
        io.write_jsonl(args.export_kto, kto)
        console().print(f"{len(kto)} rated answers -> {args.export_kto} ({neutral} rated 3 left out)")


def _votes(args):
    from llmkit.serve.votes import VoteStore

    store = VoteStore(args.db, create=False)
    if args.export:
        from llmkit import io

        rows = store.export()
        io.write_jsonl(args.export, rows)
        console().print(f"{len(rows)} votes and ratings -> {args.export}")
    return store


def cmd_eval_arena(args) -> None:
    from llmkit.evaluate.arena import leaderboard, plot_ratings

    store = _votes(args)
    if args.export_pairs or args.export_kto:
        _export_preferences(store, args)
    battles, ratings = store.battles(), store.ratings()
    if not battles and not ratings:
        raise LlmkitError(f"{args.db} has no votes and no ratings yet", "vote in the arena of `llmkit serve` (the page at /) first")
    board = leaderboard(battles, ratings, bootstrap=args.bootstrap, seed=args.seed)
    if args.png:
        plot_ratings(board, args.png)
    if args.json:
        print(json.dumps(board, indent=2, ensure_ascii=False))
        return
    print(f"{board['battles']} votes, {sum(map(len, ratings.values()))} ratings\n")
    print(f"{'model':24s} {'Bradley-Terry (95%)':>24s} {'Elo':>7s} {'games':>6s} {'W/T/L':>10s} {'mean rating':>12s}")
    for m in board["models"]:
        interval = f"({m['bt_low']:.0f}-{m['bt_high']:.0f})" if m["bt_low"] is not None else ""
        rating = f"{m['mean_rating']:.2f} ({m['ratings']})" if m["mean_rating"] is not None else "-"
        print(
            f"{m['model'][:24]:24s} {m['bt']:10.0f} {interval:>13s} {m['elo']:7.0f} {m['games']:6d} "
            f"{m['wins']:>3d}/{m['ties']}/{m['losses']:<4d} {rating:>12s}"
        )
    if args.png:
        print(f"ratings -> {args.png}")


def cmd_eval_ab(args) -> None:
    from llmkit.evaluate.arena import ab_test

    if not args.a or not args.b:
        raise LlmkitError("`llmkit eval ab` needs --a and --b", "e.g. --a smollm2 --b sft (the names the server served)")
    store = _votes(args)
    r = ab_test(store.battles(), args.a, args.b, ties=args.ties)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{args.a} against {args.b}: {r['wins']} wins, {r['losses']} losses, {r['ties']} ties (ties: {args.ties})")
    if r["n"]:
        print(
            f"win rate of {args.a}: {r['win_rate']:.3f} (95% Wilson interval {r['win_rate_low']:.3f}-{r['win_rate_high']:.3f}) "
            f"over {r['n']} votes; two-sided binomial test p = {r['p_value']:.4g}"
        )
    if r["votes_needed"] is None:
        print("the two are even: no difference to detect")
    else:
        print(f"votes for 80% power at this win rate: {r['votes_needed']} ({r['more_votes_needed']} more)")
