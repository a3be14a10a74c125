"""`llmkit demo`: the lifecycle end to end on the embedded defaults."""

from __future__ import annotations

from llmkit.cli.common import subcommand


def register(commands) -> None:
    p = subcommand(
        commands,
        "demo",
        "run the lifecycle end to end on the embedded defaults (Shakespeare)",
        ("llmkit demo", "llmkit demo --out runs/demo --vocab-size 2048 --pretrain-budget 5m"),
        cmd_demo,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the tokenizers (default: 4096)")
    p.add_argument("--pretrain-budget", default="2m", help="budget of the pretraining stage (default: 2m)")
    p.add_argument("--finetune-budget", default="40steps", help="budget of the LoRA stage (default: 40steps)")
    p.add_argument(
        "--preference-budget", default="30steps", help="budget of the DPO stage, from the LoRA model (default: 30steps; 0steps: none)"
    )


def cmd_demo(args) -> None:
    from llmkit.demo import run_demo

    run_demo(
        args.out,
        vocab_size=args.vocab_size,
        pretrain_budget=args.pretrain_budget,
        finetune_budget=args.finetune_budget,
        preference_budget=args.preference_budget,
    )
