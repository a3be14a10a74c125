"""Will it fit? The peak memory of a command before it runs, by part, against the device's free memory.

    weights       every parameter and buffer in its stored form: float32/bf16/fp16, or a 4-bit base (QLoRA: llmkit's
                  int4 layers on a CPU hold 1.125 bytes a weight, bitsandbytes' NF4 ~0.52)
    gradients     float32, one per trainable parameter
    optimizer     AdamW's two moments per trainable parameter (float32, or 8-bit)
    activations   what autograd keeps for the backward pass: *measured*, not guessed: a one- and a two-block copy of the
                  model (its real width, vocabulary and method) runs one forward pass of one row under PyTorch's
                  saved-tensor hooks, which count every byte kept (casts of the weights to bf16 by autocast, attention,
                  logits); a block's share times the layers, times the batch. With --checkpointing a block keeps only
                  its input and one block's activations come back during the backward pass. Inference: the largest
                  transient of a prefill (the logits of the last position, one block's feed-forward)
    kv_cache      decoding: keys and values of every layer for the whole context and batch
    runtime       on a CPU the process itself: Python, PyTorch and llmkit as imported (this process's resident memory
                  before the model is built), plus the loading: a model read from a GGUF file or quantized after
                  loading is held in float32 at its largest while it loads; on CUDA the context and workspace
                  (~0.5 GiB)

`predict(...)` returns the parts, their total, the device's free memory and whether it fits, with the settings that
would make it fit (a smaller batch with accumulation, checkpointing, QLoRA). On a CPU the total is the peak resident
memory of the process (benchmarks/memory_fit.py checks it against measured peaks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.devices import describe, free_bytes
from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig

COMMANDS = ("inference", "lora", "qlora", "full", "pretrain")
CUDA_RUNTIME = 512 * 2**20  # the CUDA context, cuBLAS workspace and allocator slack of one process
INT4_BYTES = 1.125  # llmkit's Int4Linear: two codes a byte (for the backward pass), the kernel's own packing, bf16 scales
NF4_BYTES = 0.52  # bitsandbytes NF4 with double quantization


@dataclass
class Plan:
    """What the command will do: its method, batch, sequence length, precision, optimizer, checkpointing."""

    command: str = "inference"  # inference | lora | qlora | full | pretrain
    batch_size: int = 1
    max_len: int = 512  # training: tokens per row; inference: prompt + new tokens
    grad_accum: int = 1
    checkpointing: bool = False
    dtype: torch.dtype = torch.float32  # the weights as held
    autocast: torch.dtype | None = None  # training's autocast dtype (None: float32)
    optimizer_bits: int = 32  # 32 (AdamW) or 8 (8-bit AdamW)
    lora_r: int = 8
    quantize: str | None = None  # inference: int8 | int4 | gguf | None


@dataclass
class Prediction:
    total_bytes: int
    parts: dict[str, int]
    device: str
    free_bytes: int
    fits: bool
    suggestions: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "parts": self.parts,
            "device": self.device,
            "free_bytes": self.free_bytes,
            "fits": self.fits,
            "suggestions": self.suggestions,
        }


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _block_linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) features of every linear layer of the model's blocks, all layers (what a 4-bit base quantizes and
    all-linear LoRA adapts), read off a one-block copy built without initialization."""
    from llmkit.model import build_model

    small = build_model(_shrunk(cfg, 1), empty=True)
    one = [(m.in_features, m.out_features) for n, m in small.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return one * cfg.n_layers


def _shrunk(cfg: ModelConfig, layers: int, narrow: int = 1) -> ModelConfig:
    """`cfg` with `layers` blocks, and its width, feed-forward and vocabulary divided by `narrow` (the same heads)."""
    import dataclasses

    extra: dict[str, Any] = {}
    if narrow > 1:
        extra.update(d_model=cfg.d_model // narrow, d_ff=int(cfg.d_ff or 0) // narrow, vocab_size=max(cfg.vocab_size // narrow, 256))
        extra["head_dim"] = max(int(cfg.head_dim or 0) // narrow, 1)
    return dataclasses.replace(cfg, n_layers=layers, **extra)


PROBE_PARAMS = 40_000_000  # the probe's copy of the model stays under this many parameters (a narrower one if need be)
PROBE_TOKENS = 128  # and runs at most this many tokens a row (activations grow linearly with the length)


def _narrowing(cfg: ModelConfig) -> int:
    """The factor the probe divides the width by: 1 for small models, else the smallest power of two that keeps the
    probe (two blocks and the embeddings) under PROBE_PARAMS with whole heads."""
    for s in (1, 2, 4, 8, 16, 32, 64):
        d, ff = cfg.d_model // s, int(cfg.d_ff or 0) // s
        whole = cfg.d_model % s == 0 and int(cfg.d_ff or 0) % s == 0 and d % cfg.n_heads == 0 and d >= cfg.n_heads
        size = 2 * (4 * d * d + 3 * d * ff) + 2 * d * max(cfg.vocab_size // s, 256)
        if whole and size <= PROBE_PARAMS:
            return s
    return 64


_PROBED: dict[tuple, int] = {}  # the probes of one model and method: the suggestions' predictions ask them again


def _saved_bytes(
    cfg: ModelConfig, layers: int, plan: Plan, rows: int = 1, narrow: int = 1, tokens: int = 128, checkpointing: bool | None = None
) -> int:
    """Bytes autograd keeps for `rows` rows of `tokens` tokens through a `layers`-block copy of the model, as the
    command would train it (its method, autocast and checkpointing); every saved tensor counted once."""
    checkpointing = plan.checkpointing if checkpointing is None else checkpointing
    key = (repr(cfg), plan.command, plan.lora_r, plan.autocast, layers, rows, narrow, tokens, checkpointing)
    if key not in _PROBED:
        _PROBED[key] = _probe(cfg, layers, plan, rows, narrow, tokens, checkpointing)
    return _PROBED[key]


def _probe(cfg: ModelConfig, layers: int, plan: Plan, rows: int, narrow: int, tokens: int, checkpointing: bool) -> int:
    """`_saved_bytes` measured: one forward pass of the copy under autograd's saved-tensor hooks."""
    from llmkit.model import build_model
    from llmkit.model.lora import apply_method
    from llmkit.model.quantize import quantize_frozen

    torch.manual_seed(0)
    model = build_model(_shrunk(cfg, layers, narrow))
    if plan.command == "qlora":
        quantize_frozen(model, "int4")
    if plan.command in ("lora", "qlora"):
        apply_method(model, "lora", lora_r=plan.lora_r)
    model.checkpointing = checkpointing
    model.train()
    ids = torch.randint(0, min(cfg.vocab_size // narrow, 256), (rows, tokens))
    seen: dict[int, int] = {}  # storage -> bytes: views of one storage (a fused projection's q, k, v) count once
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {b.untyped_storage().data_ptr() for b in model.buffers()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # the weights themselves are counted as weights
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=plan.autocast or torch.float32, enabled=plan.autocast is not None),
    ):
        if cfg.family == "encoder":  # fine-tuned as a classifier: the hidden states, no vocabulary logits
            out = model.hidden_states(ids)[0]  # type: ignore[operator]  # an Encoder's (build_model's type is the base)
        else:
            out = model(ids, ids) if cfg.family == "encoder-decoder" else model(ids)
        if out.shape[-1] == model.config.vocab_size:  # the recipe's loss: cross-entropy of the float logits (it keeps them)
            torch.nn.functional.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            out.float().sum()
    return sum(seen.values())


def predict(
    cfg: ModelConfig,
    plan: Plan,
    device: torch.device,
    *,
    source_bytes: int = 0,
    gguf_source: bool = False,
    runtime: int | None = None,
    suggest: bool = True,
) -> Prediction:
    """The peak memory of running `plan` with a model of `cfg` on `device` (see the module's docstring);
    `source_bytes`: the size of the weights' file (its pages are resident while it loads; a GGUF's stay), `gguf_source`:
    whether it is a GGUF file (dequantized as it loads)."""
    if plan.command not in COMMANDS:
        raise LlmkitError(f"unknown command {plan.command!r} to predict", f"use one of: {', '.join(COMMANDS)}")
    if plan.batch_size < 1 or plan.max_len < 1 or plan.grad_accum < 1:
        raise LlmkitError(
            f"batch {plan.batch_size}, length {plan.max_len} and accumulation {plan.grad_accum} must all be at least 1",
            "e.g. --batch-size 8 --max-len 256",
        )
    weights, per_weight = _weights(cfg, plan, device)
    trainable = _trainable(cfg, plan)
    gradients = trainable * 4
    optimizer = trainable * 2 * (4 if plan.optimizer_bits == 32 else 1)
    if plan.command != "inference":
        activations, kv_cache = _training_activations(cfg, plan), 0
    else:
        activations, kv_cache = _inference_activations(cfg, plan)
    if device.type == "cpu":
        base = resident_bytes() if runtime is None else runtime
        running = weights + gradients + optimizer + activations + kv_cache
        runtime_part = base + _loading_bytes(cfg, plan, per_weight, weights, running, source_bytes, gguf_source)
    else:
        base, runtime_part = 0, CUDA_RUNTIME
    parts = {
        "weights": int(weights),
        "gradients": int(gradients),
        "optimizer": int(optimizer),
        "activations": int(activations),
        "kv_cache": int(kv_cache),
        "runtime": int(runtime_part),
    }
    total = sum(parts.values())
    free = free_bytes(device)
    fits = total <= free
    tips = _suggestions(cfg, plan, device, free, (source_bytes, gguf_source), base) if suggest and not fits else []
    return Prediction(total, parts, describe(device), free, fits, tips)


def _weights(cfg: ModelConfig, plan: Plan, device: torch.device) -> tuple[int, float | None]:
    """(the weights' bytes as held, the bytes a quantized block weight takes, or None when none is quantized)."""
    n_params, held = cfg.param_count(), _element_bytes(plan.dtype)
    per_weight = {"qlora": NF4_BYTES if device.type == "cuda" else INT4_BYTES}.get(plan.command)
    if plan.quantize in ("int4", "gguf"):
        per_weight = 0.5625 if plan.quantize == "gguf" else INT4_BYTES
    elif plan.quantize == "int8":
        per_weight = 1.0
    if per_weight is None:
        return int(n_params * held), None
    linear = sum(i * o for i, o in _block_linears(cfg))
    return int((n_params - linear) * held + linear * per_weight), per_weight


def _trainable(cfg: ModelConfig, plan: Plan) -> int:
    """Trainable parameters: all for full fine-tuning and pretraining, LoRA's r x (in + out) per adapted layer."""
    if plan.command in ("full", "pretrain"):
        return cfg.param_count()
    if plan.command in ("lora", "qlora"):
        return sum(plan.lora_r * (i + o) for i, o in _block_linears(cfg))
    return 0


def _training_activations(cfg: ModelConfig, plan: Plan) -> float:
    """What autograd keeps, from four probes: saved(layers, rows) = fixed + per_layer·layers + per_row·rows +
    per_layer_row·layers·rows, so what does not grow with the rows (autocast's bf16 copies of the weights) is counted
    once. A big model is probed narrower and shorter: what grows with the rows grows linearly with the width and the
    length, the weights' casts with the width squared."""
    T = min(plan.max_len, cfg.max_seq_len)
    narrow, probe_t = _narrowing(cfg), min(T, PROBE_TOKENS)

    def terms(checkpointing: bool) -> tuple[float, float, float, float]:
        """(fixed, per layer, per row, per layer and row) bytes kept, scaled from the probe to the model."""
        s = {(n, b): _saved_bytes(cfg, n, plan, b, narrow, probe_t, checkpointing) for n in (1, 2) for b in (1, 2)}
        lr = s[2, 2] - s[1, 2] - s[2, 1] + s[1, 1]  # in the probe's units: saved = f + lf·layers + rf·rows + lr·layers·rows
        lf, rf = s[2, 1] - s[1, 1] - lr, s[1, 2] - s[1, 1] - lr
        f = s[1, 1] - lf - rf - lr
        per_row, per_cast = narrow * T / probe_t, narrow**2
        return f * per_cast, lf * per_cast, rf * per_row, lr * per_row

    B, L = plan.batch_size, cfg.n_layers
    fixed, layer_fixed, row_fixed, layer_row = terms(plan.checkpointing)
    kept = fixed + layer_fixed * L + B * (row_fixed + layer_row * L)
    if plan.checkpointing:  # each block keeps its input (measured); one block's activations come back at a time
        _, block_casts, _, block_rows = terms(False)
        kept += block_casts + B * block_rows
    # the backward pass of the loss: the logits' gradient in float32 and in the autocast dtype, alive at once
    grad_logits = T * cfg.vocab_size * (4 + _element_bytes(plan.autocast or torch.float32)) if cfg.family != "encoder" else 0
    return kept + B * grad_logits


def _inference_activations(cfg: ModelConfig, plan: Plan) -> tuple[int, int]:
    """(a prefill's largest transients: one block's feed-forward and the last position's logits, the KV cache)."""
    T = min(plan.max_len, cfg.max_seq_len)
    kv_heads, head_dim, d_ff = int(cfg.n_kv_heads or cfg.n_heads), int(cfg.head_dim or 0), int(cfg.d_ff or 0)
    held = _element_bytes(plan.dtype)
    kv_cache = 2 * cfg.n_layers * kv_heads * head_dim * T * plan.batch_size * held if cfg.family != "encoder" else 0
    activations = plan.batch_size * T * (max(d_ff, cfg.d_model) * 3 + cfg.d_model * 4) * 4 + plan.batch_size * cfg.vocab_size * 4
    return activations, kv_cache


def _loading_bytes(
    cfg: ModelConfig, plan: Plan, per_weight: float | None, weights: int, running: float, source_bytes: int, gguf: bool
) -> float:
    """What a CPU process holds beyond Python and PyTorch: a GGUF reader's pages (it stays open: its blocks serve the
    compiled step), and the load's peak where it exceeds the run's (the file's pages, read through a memory map; the
    weights in float32 when they are quantized after; a GGUF's largest tensor dequantized twice over)."""
    float_weights = cfg.param_count() * (4 if per_weight is not None else _element_bytes(plan.dtype))
    loading = float_weights + source_bytes + (2 * cfg.vocab_size * cfg.d_model * 4 if gguf else 0)
    stays = source_bytes if gguf else 0
    return stays + max(0, loading - (running + stays))


def _suggestions(cfg: ModelConfig, plan: Plan, device, free: int, source: tuple[int, bool], runtime: int) -> list[str]:
    """Settings that bring the prediction under `free`, each tried alone then together."""
    import dataclasses

    tries: list[tuple[str, Plan]] = []
    if plan.command != "inference":
        if plan.batch_size > 1:
            for b in (plan.batch_size // 2, plan.batch_size // 4, 1):
                if b >= 1:
                    accum = plan.grad_accum * plan.batch_size // b
                    tries.append((f"--batch-size {b} --grad-accum {accum}", dataclasses.replace(plan, batch_size=b, grad_accum=accum)))
        if not plan.checkpointing:
            tries.append(("--checkpointing", dataclasses.replace(plan, checkpointing=True)))
        if plan.command in ("lora", "full"):
            tries.append(("--method qlora", dataclasses.replace(plan, command="qlora")))
        tries.append(
            (
                f"--method qlora --checkpointing --batch-size 1 --grad-accum {plan.grad_accum * plan.batch_size}",
                dataclasses.replace(plan, command="qlora", checkpointing=True, batch_size=1, grad_accum=plan.grad_accum * plan.batch_size),
            )
        )
    else:
        if plan.max_len > 512:
            tries.append((f"a context of {plan.max_len // 2}", dataclasses.replace(plan, max_len=plan.max_len // 2)))
        if plan.batch_size > 1:
            tries.append(("--batch-size 1", dataclasses.replace(plan, batch_size=1)))
        tries.append(("--quantize int4 (answers may differ)", dataclasses.replace(plan, quantize="int4")))
    out, smallest = [], None
    for words, option in tries:
        total = predict(cfg, option, device, source_bytes=source[0], gguf_source=source[1], runtime=runtime, suggest=False).total_bytes
        if total <= free:
            out.append(words)
        if smallest is None or total < smallest[1]:
            smallest = (words, total)
    if out or smallest is None:
        return out
    words, total = smallest
    return [f"nothing llmkit offers fits: the smallest, {words}, needs {total / 2**30:.1f} GiB; a smaller model or more memory"]
