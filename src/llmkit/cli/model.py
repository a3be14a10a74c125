"""`llmkit model` (info, export, memory) and `llmkit attention`: presets, sizes, Hugging Face and GGUF export, attention
maps."""

from __future__ import annotations

import json
import os

from llmkit.cli.common import device_option, group, index_list, subcommand
from llmkit.errors import LlmkitError


def register(commands) -> None:
    model_cmds = group(
        commands,
        "model",
        "presets, sizes, export",
        (
            "llmkit model info gpt2",
            "llmkit model info --all",
            "llmkit model info smollm2",
            "llmkit model export --model runs/gpt --out runs/gpt-hf",
            "llmkit model export --model smollm2 --format gguf --quant q8_0 --out smollm2.gguf",
            "llmkit model memory smollm2 --method qlora --batch-size 8 --max-len 256",
        ),
        "model commands",
    )
    p = subcommand(
        model_cmds,
        "info",
        "parameters and FLOPs per token of a preset or a model",
        ("llmkit model info gpt2", "llmkit model info --all", "llmkit model info smollm2 --seq-len 2048"),
        cmd_model_info,
    )
    p.add_argument("model", nargs="?", help="a preset name (gpt2, llama, bert, t5, vaswani, tiny-*) or a model (path, smollm2, minilm)")
    # the other commands name their model with --model: taken here too
    p.add_argument("--model", dest="model_option", default=None, help="the same as the positional MODEL")
    p.add_argument("--all", action="store_true", help="a table of every preset")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention FLOPs (default: the context length)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = subcommand(
        model_cmds,
        "export",
        "write a model as a Hugging Face folder (transformers) or a GGUF file (llama.cpp, Ollama)",
        (
            "llmkit model export --model runs/gpt --out runs/gpt-hf",
            "llmkit model export --model minilm --out runs/minilm-hf",
            "llmkit model export --model runs/smollm2-lora --format gguf --quant q8_0 --out runs/smollm2-lora.gguf",
        ),
        cmd_model_export,
    )
    p.add_argument("--model", default=None, help="a run folder (a LoRA run: merged), Hugging Face folder, GGUF file, smollm2 or minilm")
    p.add_argument("--out", default=None, help="output folder (hf) or .gguf file (gguf) (required)")
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default=None,
        help="hf: a transformers folder; gguf: one llama.cpp file (default: gguf when --out ends in .gguf)",
    )
    p.add_argument(
        "--quant",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default="f16",
        help="GGUF matrices (default f16, as llama.cpp's converter; q4_0 keeps the embeddings in q8_0)",
    )
    p = subcommand(
        model_cmds,
        "memory",
        "will it fit? a command's peak memory by part (weights, gradients, optimizer, activations, KV cache) and what would fit",
        (
            "llmkit model memory smollm2",
            "llmkit model memory smollm2 --method lora --batch-size 8 --max-len 256",
            "llmkit model memory llama --method full --batch-size 16 --max-len 1024 --device cuda --json",
            "llmkit model memory minilm --method qlora --checkpointing",
        ),
        cmd_model_memory,
    )
    p.add_argument("model", nargs="?", help="a preset (gpt2, llama, ...) or a model (path, smollm2, minilm)")
    p.add_argument(
        "--method",
        default="inference",
        choices=["inference", "lora", "qlora", "full", "pretrain"],
        help="what runs: inference (generate, chat, serve, embed; default), fine-tuning (lora, qlora, full) or pretrain",
    )
    p.add_argument("--batch-size", type=int, default=None, help="rows at once (default: 1 for inference, 8 for training)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per row: training's --max-len, or prompt + answer (default: 256)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="the weights as held (auto: the device's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="training's autocast (auto: the device's)")
    p.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit"], help="optimizer states in 32 or 8 bits")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "gguf"], help="inference: the weights' form")
    device_option(p)
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")

    p = subcommand(
        commands,
        "attention",
        "draw attention maps (layers x heads) of a sentence as a PNG",
        (
            "llmkit attention --model smollm2 'The cat sat on the mat because it was tired.'",
            "llmkit attention --model minilm --layers 0,5 --heads 0-3 'Time flies like an arrow.' --out attn.png",
        ),
        cmd_attention,
    )
    p.add_argument("sentence", nargs="?", default=None, help="the sentence to look at")
    p.add_argument("--model", default="smollm2", help="a model: run folder, Hugging Face folder, GGUF file, smollm2 or minilm")
    p.add_argument("--layers", default=None, help="layers to draw: '0,3,5' or '0-5' (default: all)")
    p.add_argument("--heads", default=None, help="heads to draw: '0,1' or '0-3' (default: all)")
    p.add_argument("--out", default="attention.png", help="the PNG to write (default: attention.png)")


def _cfg_row(name: str, cfg, seq_len) -> dict:
    flops = cfg.flops_per_token(seq_len)
    return {
        "name": name,
        "family": cfg.family,
        "params": cfg.param_count(),
        "d_model": cfg.d_model,
        "layers": cfg.n_layers,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "context": cfg.max_seq_len,
        "sliding_window": cfg.sliding_window,
        "windowed_layers": sum(cfg.windowed(i) for i in range(cfg.n_layers)) if cfg.family == "decoder" else 0,
        "position": cfg.position,
        "activation": cfg.activation,
        "norm": f"{cfg.norm} ({cfg.norm_position})",
        "flops_per_token_forward": flops["forward"],
        "flops_per_token_train": flops["train"],
    }


def cmd_model_info(args) -> None:
    from llmkit.model.config import PRESETS, preset
    from llmkit.progress import print_table

    if args.model_option is not None:
        if args.model is not None and args.model != args.model_option:
            raise LlmkitError(f"two models named: {args.model} and --model {args.model_option}", "name one")
        args.model = args.model_option
    if args.all:
        rows = [_cfg_row(n, preset(n), args.seq_len) for n in PRESETS]
    elif not args.model:
        raise LlmkitError("`llmkit model info` needs a preset or a model", f"e.g. `llmkit model info gpt2`; presets: {', '.join(PRESETS)}")
    elif args.model in PRESETS:
        rows = [_cfg_row(args.model, preset(args.model), args.seq_len)]
    else:
        import llmkit

        rows = [_cfg_row(args.model, llmkit.load(args.model).config, args.seq_len)]
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=2))
        return
    from rich.table import Table

    cells = {
        "name": [r["name"] for r in rows],
        "family": [r["family"] for r in rows],
        "params": [f"{r['params']:,}" for r in rows],
        "d_model": [str(r["d_model"]) for r in rows],
        "layers": [str(r["layers"]) for r in rows],
        "heads/kv": [f"{r['heads']}/{r['kv_heads']}" for r in rows],
        "context": [str(r["context"]) + (_window(r) if r["sliding_window"] else "") for r in rows],
        "position": [r["position"] for r in rows],
        "activation": [r["activation"] for r in rows],
        "norm": [r["norm"] for r in rows],
        "GFLOPs/token fwd": [f"{r['flops_per_token_forward'] / 1e9:.3f}" for r in rows],
        "GFLOPs/token train": [f"{r['flops_per_token_train'] / 1e9:.3f}" for r in rows],
    }
    table = Table(title="FLOPs per token: 6N + 12·L·d·T for training, a third of it forward")
    if len(rows) == 1:  # one model: a property per line, which fits an 80-column terminal
        table.add_column("property")
        table.add_column("value")
        for key, values in cells.items():
            table.add_row(key, values[0])
    else:
        for key in cells:
            table.add_column(key, justify="left" if key in ("name", "family", "position", "activation", "norm") else "right")
        for i in range(len(rows)):
            table.add_row(*(values[i] for values in cells.values()))
    print_table(table)


def _window(row: dict) -> str:
    return f" (window {row['sliding_window']}: {row['windowed_layers']}/{row['layers']} layers)"


def cmd_model_memory(args) -> None:
    from llmkit.devices import dtype_for, resolve
    from llmkit.model.memory import Plan, predict, resident_bytes
    from llmkit.model.weights import config_of, weight_files
    from llmkit.train.runtime import autocast_dtype

    if not args.model:
        raise LlmkitError("`llmkit model memory` needs a model or a preset", "e.g. `llmkit model memory smollm2 --method lora`")
    for flag, value in (("--batch-size", args.batch_size), ("--max-len", args.max_len), ("--grad-accum", args.grad_accum)):
        if value is not None and value < 1:
            raise LlmkitError(f"{flag} {value} is not a size: it must be at least 1", f"e.g. {flag} {8 if flag == '--batch-size' else 256}")
    if args.lora_r < 1:
        raise LlmkitError(f"--lora-r {args.lora_r} must be at least 1", "e.g. --lora-r 8")
    training = args.method != "inference"
    if training and args.quantize != "none":
        raise LlmkitError(
            f"--quantize {args.quantize} is the weights' form for inference; fine-tuning's 4-bit base is --method qlora",
            "leave out --quantize, or use --method inference",
        )
    runtime = resident_bytes()  # this process as imported: what any command's process holds before its model
    device = resolve(args.device)
    cfg = config_of(args.model)
    size, gguf = weight_files(args.model)
    dtype = dtype_for(args.dtype, device)
    if training and args.method != "pretrain":
        dtype = dtype_for("fp32", device)  # fine-tuning holds float32 weights (a QLoRA base's other parts too) and autocasts
    plan = Plan(
        command=args.method,
        batch_size=args.batch_size if args.batch_size is not None else (8 if training else 1),
        max_len=args.max_len if args.max_len is not None else 256,
        grad_accum=args.grad_accum,
        checkpointing=args.checkpointing,
        dtype=dtype,
        autocast=autocast_dtype(args.precision, device) if training else None,
        optimizer_bits=8 if args.optim == "adamw8bit" else 32,
        lora_r=args.lora_r,
        quantize=None if args.quantize == "none" else args.quantize,
    )
    p = predict(cfg, plan, device, source_bytes=size, gguf_source=gguf, runtime=runtime)
    if args.json:
        print(json.dumps(p.as_json()))
        return
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
    print(f"{args.model}, {args.method}: batch {plan.batch_size} x {plan.max_len} tokens on {p.device}")
    for name, value in p.parts.items():
        print(f"  {name:<12} {gib(value):>10}")
    print(f"  {'total':<12} {gib(p.total_bytes):>10}   free: {gib(p.free_bytes)}  ->  {'fits' if p.fits else 'does NOT fit'}")
    for tip in p.suggestions:
        print(f"  would fit with: {tip}" if tip.startswith("--") or tip.startswith("a ") else f"  {tip}")
    if training:
        print(f"  (every row counted {plan.max_len} tokens long, as packed rows are: shorter rows take less activation memory)")
    if p.parts["runtime"] > runtime * 1.05 and device.type == "cpu":
        print(f"  (runtime: Python and PyTorch, {gib(runtime)}, and the weights' file and float32 copy while the model loads)")


def cmd_model_export(args) -> None:
    import llmkit
    from llmkit.model.weights import export_hf

    if not args.model or not args.out:
        raise LlmkitError("`llmkit model export` needs --model and --out", "e.g. `llmkit model export --model runs/gpt --out runs/gpt-hf`")
    fmt = args.format or ("gguf" if str(args.out).endswith(".gguf") else "hf")
    if fmt == "hf" and args.quant != "f16":
        raise LlmkitError("--quant applies to --format gguf only", "drop --quant, or add --format gguf")
    model = llmkit.load(args.model)
    if fmt == "gguf":
        from llmkit.model.convert.gguf import export_gguf, gguf_architecture, llama_cpp_notes

        out = args.out if str(args.out).endswith(".gguf") else f"{args.out}.gguf"
        export_gguf(model, out, model.tokenizer, quant=args.quant)
        arch = gguf_architecture(model.config).name
        print(f"exported {arch} ({model.config.param_count():,} parameters, {args.quant}) -> {out}")
        for note in llama_cpp_notes(model.config, model.tokenizer):
            print(f"  note: {note}")
        print(f"  llama.cpp: llama-cli -m {out}    Ollama: a Modelfile with `FROM ./{os.path.basename(out)}`, then `ollama create NAME`")
        return
    export_hf(model, args.out, tokenizer=model.tokenizer)
    from llmkit.model.convert.hf import hf_config_for

    kind = hf_config_for(model.config)["model_type"]
    print(f"exported {kind} ({model.config.param_count():,} parameters) -> {args.out}")


def cmd_attention(args) -> None:
    import llmkit
    from llmkit.model.attention_plot import attention_for_text, plot_attention

    if not args.sentence:
        raise LlmkitError("`llmkit attention` needs a sentence", "e.g. `llmkit attention --model smollm2 'The cat sat on the mat.'`")
    model = llmkit.load(args.model)
    labels, maps = attention_for_text(model, args.sentence)
    layers, heads = plot_attention(
        labels,
        maps,
        args.out,
        layers=index_list(args.layers),
        heads=index_list(args.heads),
        title=f"{args.model}: attention of {len(labels)} tokens (rows: queries, columns: keys)",
    )
    n_layers, n_heads = len(maps), maps[0].shape[0]
    drawn = (
        ""
        if (len(layers), len(heads)) == (n_layers, n_heads)
        else f"; drew layers {_ranges(layers)} x heads {_ranges(heads)} (--layers, --heads)"
    )
    print(f"{n_layers} layers x {n_heads} heads, {len(labels)} tokens{drawn} -> {args.out}")


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (as --layers and --heads take them)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
