"""`llmkit finetune`, `llmkit finetune compare` and `llmkit finetune pairs`: full, LoRA, adapter and preference
fine-tuning, methods side by side, and a preference set a model's own answers and a verifier make."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.cli.common import console, device_option, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    from llmkit.finetune.recipe import FinetuneConfig

    f = FinetuneConfig()
    for name in ("finetune", "finetune-compare"):
        compare_cmd = name == "finetune-compare"
        p = subcommand(
            commands,
            name,
            "compare fine-tuning methods on one task: gain against forgetting"
            if compare_cmd
            else "fine-tune a model: full, LoRA or bottleneck adapters, with forgetting measured",
            (
                "llmkit finetune compare --model smollm2 --task arithmetic --methods full,lora,multitask-lora --shots 0,3",
                "llmkit finetune compare --model minilm --task genre --methods full,lora",
                "llmkit finetune compare --model smollm2 --task arithmetic --methods lora,lora+dpo,lora+grpo --budget 40steps",
            )
            if compare_cmd
            else (
                "llmkit finetune --model smollm2 --method lora --task arithmetic --budget 100steps",
                "llmkit finetune --model smollm2 --method full --task arithmetic:2,reverse:1,sort:1 --lr 5e-5",
                "llmkit finetune --model minilm --method lora --task genre --budget 200steps",
                "llmkit finetune --model smollm2 --method lora --data my.jsonl --lora-r 16 --lora-targets q_proj,v_proj",
                "llmkit finetune --out runs/finetune --resume",
                "llmkit finetune compare --model smollm2 --task arithmetic   # see its --help",
                "llmkit finetune pairs --model runs/finetune --task arithmetic --out pairs.jsonl   # then --method dpo",
            ),
            cmd_finetune_compare if compare_cmd else cmd_finetune,
        )
        if compare_cmd:
            p.prog = "llmkit finetune compare"  # as it is typed
        if not compare_cmd:
            p.add_argument(
                "--method",
                default=f.method,
                choices=["full", "lora", "qlora", "adapter", "dpo", "orpo", "grpo"],
                help="what to train (default: lora; qlora: LoRA on the base frozen in 4 bits; dpo, orpo: from preference "
                "pairs in --data; grpo: from a verifier's rewards on sampled answers; the last three with LoRA unless --full)",
            )
            p.add_argument("--loss", default=f.loss, choices=["sigmoid", "ipo"], help="dpo: DPO's sigmoid loss (default) or IPO's")
            p.add_argument(
                "--answer-tag",
                action="store_true",
                help="grpo: each prompt asks for the answer between <answer> and </answer>; the verifier reads it there, and a "
                "format reward (1 for one answer block ending the completion) is added to the answer's (DeepSeek-R1's two rewards)",
            )
            p.add_argument(
                "--label-smoothing",
                type=float,
                default=f.label_smoothing,
                help="dpo: conservative DPO's share of flipped labels (default 0)",
            )
            p.add_argument(
                "--full",
                action="store_true",
                help="dpo, orpo, grpo: train every weight instead of LoRA (DPO and GRPO keep a frozen reference copy)",
            )
            p.add_argument(
                "--quantize",
                default=f.quantize,
                choices=["none", "auto", "int4", "nf4"],
                help="LoRA's frozen base in 4 bits (QLoRA): int4 (llmkit's CPU kernel), nf4 (CUDA, bitsandbytes), auto "
                "(the device's; what --method qlora uses) or none (default)",
            )
        else:
            p.add_argument(
                "--methods",
                default="full,lora,adapter,multitask-lora",
                help="comma list of full, lora, adapter, multitask-METHOD (trained on a mixture with other tasks), dpo, orpo "
                "(on pairs the model's own answers make, judged by the task's verifier), grpo (on the verifier's rewards), and "
                "SFT+PREFERENCE chains such as lora+dpo (DPO from the lora row's model)",
            )
            p.add_argument("--shots", default="0,3", help="k-shot in-context accuracy of the untouched model, for each k (default: 0,3)")
            p.add_argument("--curve", default="", help="also train the first method on these numbers of examples, e.g. 100,500,1000")
        # the preference methods' settings (in a comparison, its dpo, orpo and grpo rows')
        p.add_argument(
            "--beta",
            type=float,
            default=None,
            help="dpo: β, the pull toward the reference (0.1); orpo: λ (0.1); grpo: the KL weight (0.04)",
        )
        p.add_argument("--group-size", type=int, default=f.group_size, help="grpo: completions sampled per prompt (default: 4)")
        p.add_argument("--reward", default=None, metavar="MODULE:FUNCTION", help="grpo: f(prompt, completion, answer) -> number")
        p.add_argument(
            "--grpo-loss", default=f.grpo_loss, choices=["grpo", "dr_grpo"], help="grpo: GRPO's, or Dr. GRPO's length-unbiased one"
        )
        p.add_argument("--epsilon", type=float, default=f.epsilon, help="grpo: the clip of the probability ratio (default: 0.2)")
        p.add_argument("--temperature", type=float, default=f.temperature, help="grpo: the sampling temperature (default: 1.0)")
        p.add_argument("--model", default=f.model, help="smollm2 (default), minilm, or a run / Hugging Face folder")
        p.add_argument(
            "--task", default=f.task, help="arithmetic, reverse, sort, dates, play; a mixture 'arithmetic:2,reverse:1'; genre (encoders)"
        )
        p.add_argument("--eval-task", default=None, help="evaluate on this task (default: the training task)")
        p.add_argument("--data", default=None, help="a JSONL/CSV/TSV file of rows instead of a built-in task")
        p.add_argument(
            "--glue",
            default=None,
            metavar="TASK",
            help="read --data as this GLUE/SuperGLUE task's official file (sst2, "
            "cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli, boolq, cb, copa, multirc, record, wic, wsc) and score it officially",
        )
        p.add_argument(
            "--regression",
            action="store_true",
            help="numeric labels are scores to predict, even when all are whole numbers "
            "(default: regression only when some label is not a whole number)",
        )
        p.add_argument("--val-data", default=None, help="validation rows (default: a tenth of --data)")
        p.add_argument("--n-train", type=int, default=f.n_train, help=f"built-in task: training examples (default: {f.n_train})")
        p.add_argument("--n-val", type=int, default=f.n_val, help=f"built-in task: validation examples (default: {f.n_val})")
        p.add_argument(
            "--budget",
            default=None,
            help="when to stop: steps, time or tokens (default: 100steps"
            + (
                "; each row's)"
                if compare_cmd
                else "; with --resume the run's own: a finished run then says so, and a larger budget trains it further)"
            ),
        )
        p.add_argument("--batch-size", type=int, default=f.batch_size)
        p.add_argument("--grad-accum", type=int, default=f.grad_accum)
        p.add_argument(
            "--lr",
            type=float,
            default=None,
            help="learning rate (default: full 5e-5, lora and adapter 1e-3, dpo and orpo 2e-4 with LoRA, 5e-6 --full)",
        )
        p.add_argument("--warmup", type=int, default=f.warmup)
        p.add_argument(
            "--max-len", type=int, default=f.max_len, help="longest example in tokens; longer ones are dropped (or cut with --truncate)"
        )
        p.add_argument("--truncate", action="store_true", help="cut examples longer than --max-len instead of dropping them")
        p.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
        p.add_argument("--train-on-prompt", action="store_true", help="also put the loss on the prompt tokens")
        p.add_argument("--lora-r", type=int, default=f.lora_r)
        p.add_argument("--lora-alpha", type=float, default=f.lora_alpha)
        p.add_argument("--lora-dropout", type=float, default=f.lora_dropout)
        p.add_argument("--lora-targets", default=f.lora_targets, help="all-linear, names (q_proj,v_proj) or a regular expression")
        p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
        p.add_argument("--adapter-size", type=int, default=f.adapter_size, help="bottleneck width of the adapters")
        p.add_argument("--precision", default=f.precision, choices=["auto", "fp32", "bf16", "fp16"], help="autocast (auto: the device's)")
        device_option(p, f.device)
        p.add_argument(
            "--optim",
            default=f.optim,
            choices=["adamw", "adamw8bit"],
            help="AdamW's states in float32 (default) or 8 bits (bitsandbytes, CUDA only)",
        )
        p.add_argument(
            "--fsdp",
            action="store_true",
            help="under torchrun, shard full fine-tuning with FSDP2 (default: DDP, each process a whole copy)",
        )
        p.add_argument(
            "--checkpointing",
            action="store_true",
            help="activation checkpointing: recompute each block's activations in the backward pass (less memory, ~30%% more time)",
        )
        p.add_argument("--max-new-tokens", type=int, default=f.max_new_tokens, help="answer length when evaluating")
        p.add_argument(
            "--forgetting-tasks",
            default=f.forgetting_tasks,
            help="built-in tasks measured before and after (those not trained on; none: no task)",
        )
        p.add_argument("--n-forgetting", type=int, default=f.n_forgetting, help="examples per untrained task (default: 24)")
        p.add_argument("--general-tokens", type=int, default=f.general_tokens, help="tokens of general text scored (default: 2048)")
        p.add_argument(
            "--general-text", default=f.general_text, help="held-out general text for bits per byte (default: shakespeare:the-tempest)"
        )
        p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (always at the end)")
        p.add_argument("--seed", type=int, default=f.seed)
        p.add_argument("--out", default=f.out if not compare_cmd else "runs/finetune-compare")
        if not compare_cmd:
            p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
            p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    register_pairs(commands)


def register_pairs(commands) -> None:
    p = subcommand(
        commands,
        "finetune-pairs",
        "preference pairs from a model's own answers, judged by a built-in task's verifier (no human)",
        (
            "llmkit finetune pairs --model runs/finetune --task arithmetic --out pairs.jsonl",
            "llmkit finetune --model runs/finetune --method dpo --data pairs.jsonl --eval-task arithmetic",
        ),
        cmd_finetune_pairs,
    )
    p.prog = "llmkit finetune pairs"  # as it is typed
    p.add_argument("--model", default="smollm2", help="the model that answers (smollm2, a run folder, a LoRA run)")
    p.add_argument("--task", default="arithmetic", help="a built-in task with a verifier: arithmetic, reverse, sort, dates")
    p.add_argument("--prompts", type=int, default=160, help="questions from the task's training split (default: 160)")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per question (default: 4)")
    p.add_argument("--temperature", type=float, default=0.8, help="the sampling temperature (default: 0.8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="an answer's length limit (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="the questions drawn and the samples (default: 0)")
    device_option(p, "auto")
    p.add_argument("--out", default="pairs.jsonl", help="the JSONL file of pairs (prompt, chosen, rejected)")


def cmd_finetune_pairs(args) -> None:
    from llmkit import io
    from llmkit.finetune.preference import build_pairs

    con = console()
    pairs, counts = build_pairs(
        args.model,
        args.task,
        prompts=args.prompts,
        samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        device=args.device,
        log=lambda m: con.print(m, markup=False, highlight=False),
    )
    if not pairs:
        raise LlmkitError(
            f"{args.model} answered none of {counts['questions']} questions both right and wrong: no pair to write",
            "fine-tune it on the task first (llmkit finetune --method lora --task ...), or raise --samples / --temperature",
        )
    io.write_jsonl(args.out, pairs)
    con.print(f"{len(pairs)} pairs -> {args.out}")


def _finetune_config(args):
    import dataclasses

    from llmkit.finetune.recipe import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_finetune(args) -> None:
    from llmkit.finetune.recipe import finetune

    con = console()
    cfg = _finetune_config(args)
    if cfg.method == "grpo":
        from llmkit.finetune.grpo import grpo as run

        result = run(cfg, log=lambda m: con.print(m, markup=False, highlight=False))
    else:
        result = finetune(cfg, log=lambda m: con.print(m, markup=False, highlight=False))
    if args.json:
        print(json.dumps(result))


def cmd_finetune_compare(args) -> None:
    from llmkit.finetune.compare import check_methods, compare
    from llmkit.progress import print_table

    skip = {"methods", "shots", "curve", "out", "config", "_handler", "_parser", "debug"}
    base = []
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        base += [flag] if value is True else [flag, str(value)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    con = console()
    summary = compare(
        base,
        methods,
        Path(args.out),
        task=args.task,
        model=args.model,
        shots=[int(k) for k in args.shots.split(",") if k.strip()] if args.task != "genre" else [],
        curve=[int(n) for n in args.curve.split(",") if n.strip()],
        n_val=args.n_val,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        log=lambda m: con.print(m),
    )
    from rich.table import Table

    table = Table(title=f"fine-tuning {args.model} on {args.task}")
    for col in (
        "method",
        "train ex.",
        "trainable",
        "before",
        "after",
        "gain",
        "general bpb change",
        "untrained tasks change",
        "embedding cosine",
        "seconds",
        "peak MB",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in summary["rows"]:
        table.add_row(
            r["method"],
            fmt(r["n_train"], "d") if r["n_train"] else "",
            f"{r['trainable_share']:.2%}",
            f"{r['before']:.3f}",
            f"{r['after']:.3f}",
            f"{r['gain']:+.3f}",
            fmt(r["general_bpb_change"], "+.4f"),
            fmt(r["untrained_change"], "+.3f"),
            fmt(r["embedding_drift"], ".3f"),
            f"{r['seconds']:.0f}",
            f"{r['peak_memory_mb']:.0f}",
        )

    print_table(table)
    for m, why in summary.get("failed", {}).items():
        print(f"{m}: not run ({why})")
    for k, acc in summary["few_shot"].items():
        print(f"{k}-shot in-context (no training): {acc:.3f}")
    print(f"table -> {Path(args.out) / 'compare.json'}, chart -> {Path(args.out) / 'compare.png'}")
