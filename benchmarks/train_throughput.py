"""Training throughput: llmkit's GPT against Hugging Face `transformers`' GPT2LMHeadModel, same shapes, same batch,
same optimizer (AdamW), one process, in one run. Prints tokens/s, MFU and the ratio.

    python benchmarks/train_throughput.py                      # CPU: the default `llmkit pretrain` model shape
    python benchmarks/train_throughput.py --device cuda --preset gpt2 --batch-size 16 --block-size 1024 --compile

On CUDA use bf16 autocast (both sides) and --compile for the numbers the issue asks for (MFU against the datasheet
peak). On CPU each side runs in fp32 and in bf16 autocast; llmkit's default (`--precision auto`) is bf16 where the CPU
has AVX512-BF16 / AMX.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from llmkit.model import build_model, preset
from llmkit.train.runtime import peak_flops


def hf_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
    )
    try:
        return GPT2LMHeadModel(hf, attn_implementation="sdpa")
    except TypeError:
        return GPT2LMHeadModel(hf)


def measure(model, batch: torch.Tensor, dtype, steps: int, warmup: int, device) -> float:
    """Median tokens/s of full training steps (forward, loss, backward, AdamW step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y = batch[:, :-1], batch[:, 1:]
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return x.numel() / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-gpt")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default: fp32,bf16 on CPU, bf16 on CUDA)")
    args = p.parse_args()
    device = torch.device(args.device)
    precisions = (args.precisions or ("bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    cfg = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.block_size)
    flops = cfg.flops_per_token(args.block_size)["train"]
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.block_size + 1), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{name}, torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    print(
        f"{args.preset}: {sum(p.numel() for p in build_model(cfg).parameters()):,} parameters, "
        f"batch {args.batch_size} x {args.block_size}, "
        f"compile={args.compile}"
    )
    for prec in precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[prec]
        peak, source = peak_flops(device, dtype)
        rates = {}
        for label, make in (("llmkit", lambda: build_model(cfg)), ("transformers", lambda: hf_gpt2(cfg))):
            model = make().to(device)
            if args.compile:
                model = torch.compile(model)
            rates[label] = measure(model, batch, dtype, args.steps, args.warmup, device)
            del model
        for label, rate in rates.items():
            print(
                f"{prec:>5} {label:<13} {rate:>12,.0f} tokens/s   MFU {flops * rate / peak:6.1%}  "
                f"(peak {peak / 1e12:.1f} TFLOP/s, {source})"
            )
        print(f"{prec:>5} ratio llmkit / transformers: {rates['llmkit'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
