"""Fast CPU decoding from fewer bytes per weight: a GGUF file's own blocks (exact), or int8 and int4 weights (opt-in).

Decoding one token reads every weight once, so its speed is set by memory traffic and per-op overhead, not FLOPs.

    gguf   the file's Q4_0 / Q4_1 / Q8_0 blocks, decoded in float32 inside the compiled decode step: the same weights
           `--quantize none` multiplies, half a byte each instead of four (`BlockLinear`; the default for GGUF files)
    int8   symmetric per output channel:  w ≈ q · scale,               q in [-127, 127]   (`_weight_int8pack_mm`)
    int4   asymmetric per group of 32 inputs, as llama.cpp's Q4_1 (outputs a multiple of 16):
           w ≈ q · scale + min = (q - 8) · scale + (min + 8 · scale),  q in [0, 15]       (`_weight_int4pack_mm_for_cpu`)

int8 and int4 round, and are for a user who asks: PyTorch's fast int4 kernel takes bf16 activations, bf16 scales and
zero points, and writes a bf16 output (its float32 path is a scalar reference, ~40x slower), so even a Q4_1 file's own
codes give other numbers through it (SmolLM2: top-1 agreement with the float weights 97%, and "What is the capital of
France?" answered wrongly; benchmarks/RESULTS.md). With int4 the output matrix (the LM head) stays int8, as llama.cpp
keeps it at 8 bits, and multiplies int8 activations by its int8 weights after a fixed random rotation of its inputs
(`Int8Linear(activations="int8")`); a layer the int4 kernel cannot take (inputs not a multiple of the group, outputs
not of 16) is quantized to int8 instead. Before quantizing, `fuse_projections` merges q/k/v and gate/up into one matrix
each, so a decoding step runs 4 matrix multiplies per layer instead of 7. Embedding tables are left alone (a lookup
reads one row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError

METHODS = ("gguf", "int8", "int4")
GEMV_ROWS = 8  # up to this many rows the compiled step reads the blocks; more share one float32 matmul (RESULTS.md)
INT4_GROUP = 32


class Int8Linear(nn.Module):
    """int8 weights, symmetric per output channel: w ≈ q · scale.

    `activations="int8"` also rounds each input row to int8 (one scale per row) and multiplies int8 × int8 in
    `torch._int_mm` (VNNI on x86): the same weight bytes, about half the time of the bf16-activation kernel for one row.
    A few hidden dimensions carry most of an LLM's activation (SmolLM2's final hidden state: absmax 12× its rms), which
    one scale per row rounds badly; so the inputs are first turned by a fixed random orthogonal matrix R (x W^T =
    (x R)(W R)^T, as QuaRot/SpinQuant do), which spreads them evenly (absmax 3× rms) and smooths the weight rows too:
    on SmolLM2's head, int8 × int8 after the rotation errs less than int8 weights alone."""

    def __init__(self, linear: nn.Linear, activations: str = "bf16"):
        super().__init__()
        if activations not in ("bf16", "int8"):
            raise ValueError(f"activations must be bf16 or int8, not {activations!r}")
        self.activations = activations
        w = linear.weight.detach().float()
        if activations == "int8":
            rotation = random_rotation(w.shape[1]).to(w.device)  # (in, in), orthogonal
            # kept as its float32 bits in an int32 buffer: `.to(dtype)` casts only floating buffers, so a cast of the
            # model after quantizing cannot round the rotation (the weights were rounded after it, in float32)
            self.register_buffer("rotation_bits", rotation.view(torch.int32))
            w = w @ rotation
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._kernel = hasattr(torch.ops.aten, "_weight_int8pack_mm")

    @property
    def rotation(self) -> torch.Tensor:
        """The (in, in) orthogonal matrix the inputs are turned by (activations="int8"), in float32."""
        return self.rotation_bits.view(torch.float32)

    def dequantized(self) -> torch.Tensor:
        w = self.weight_int8.float() * self.scale.float()[:, None]  # (out, in)
        return w @ self.rotation.t() if self.activations == "int8" else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        a8 = self.activations == "int8"
        if a8:
            x2 = x2.float() @ self.rotation  # the inputs turned as the weights were
        cpu = x.device.type == "cpu"
        if a8 and cpu:
            row_scale = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0  # (N, 1)
            xq = torch.round(x2 / row_scale).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * row_scale * self.scale.float()  # (N, out)
        elif self._kernel and cpu:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scale)  # (N, out)
        else:  # other devices: the int8 weights in bf16
            y = F.linear(x2.to(torch.bfloat16), self.weight_int8.to(torch.bfloat16) * self.scale[:, None])
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class BlockLinear(nn.Module):
    """A GGUF file's own quantized blocks, with the float32 weights they decode to exactly:

        Q4_1   w = d · q + m          q in 0..15    d, m float16 per block of 32 inputs
        Q4_0   w = d · (q - 8)        q in 0..15
        Q8_0   w = d · q              q in -127..127

    Eagerly (the prefill, a decode step that is not compiled) it is `F.linear` on the float32 weights. Inside the
    compiled decode step, for up to GEMV_ROWS rows, it reads the blocks instead: the expression below (codes to float,
    times d, plus m, times the input, summed) is one loop after inductor fuses it, in float32, so a token reads ~0.6 byte
    per weight instead of 4 and computes the same weights' products (only the order of the float32 sums differs).
    Batches of more rows multiply the float32 matrix once for all of them: past 8 rows that costs less than decoding the
    blocks once per row (SmolLM2, 2 threads, ms a step from the blocks / the float32 matrix: 4 rows 34 / 77, 8 rows
    66 / 80, 16 rows 104 / 90).
    The blocks are checked against the float weights when this is made: a weight changed since the file
    was read (fine-tuned, merged) is refused."""

    def __init__(self, linear: nn.Linear | list[nn.Linear], kind: str, raw: torch.Tensor):
        """`linear`: the layer the blocks `raw` hold, or several layers over the same inputs (q/k/v, gate/up) with
        their blocks row-stacked: the compiled step then reads them in one loop, from one set of buffers (SmolLM2: 270
        fewer inputs and 0.7 ms less a token), while eagerly each layer multiplies its own float weights (kept, not
        copied) and their outputs are joined."""
        super().__init__()
        if kind not in ("Q4_0", "Q4_1", "Q8_0"):
            raise LlmkitError(f"GGUF block type {kind} is not decoded exactly by llmkit", "use --quantize none (float32 weights)")
        parts = linear if isinstance(linear, list) else None
        weight = torch.cat([p.weight.detach() for p in parts]) if parts else linear.weight.detach()  # type: ignore[union-attr]
        out, inp = weight.shape
        if raw.shape[:2] != (out, inp // 32) or inp % 32:
            raise ValueError(f"{kind} blocks {tuple(raw.shape)} do not fit a ({out}, {inp}) weight")
        self.kind, self.in_features, self.out_features = kind, inp, out
        if parts:
            self.parts: nn.ModuleList | None = nn.ModuleList(parts)  # the eager path (the same modules as q_proj, ...)
            self.weight = None
            biases = [p.bias for p in parts]
            self.bias = None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
        else:
            self.parts = None
            self.weight = linear.weight  # type: ignore[union-attr]  (the float32 weights: shared, not copied)
            self.bias = linear.bias  # type: ignore[union-attr]
        d = raw[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # (out, blocks)
        self.register_buffer("scale", d)
        if kind == "Q8_0":
            self.register_buffer("codes", raw[..., 2:34].contiguous().view(torch.int8))  # (out, blocks, 32)
            self.register_buffer("minimum", None)
        else:
            m = raw[..., 2:4].contiguous().view(torch.float16).float()[..., 0] if kind == "Q4_1" else -8 * d  # Q4_0: d·q - 8d
            first = 4 if kind == "Q4_1" else 2
            self.register_buffer("codes", raw[..., first : first + 16].contiguous())  # (out, blocks, 16): element j low, j+16 high
            self.register_buffer("minimum", m)
        if not torch.equal(self.dequantized(), weight):
            raise LlmkitError(
                "the weights no longer equal the GGUF file's blocks (changed after loading)", "decode them with --quantize none"
            )

    def dequantized(self) -> torch.Tensor:
        """The float32 weights (out, in) the blocks hold, computed as the gguf package computes them."""
        d = self.scale[..., None]
        if self.kind == "Q8_0":
            w = self.codes.float() * d
        else:
            m = self.minimum[..., None]
            w = torch.cat([(self.codes & 15).float() * d + m, (self.codes >> 4).float() * d + m], -1)
        return w.reshape(self.out_features, self.in_features)

    def _from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) float32 -> (N, out), every block's codes read inside the sum (for inductor to fuse into one loop):

            y = Σ_blocks d · Σ_j q_j x_j  +  m · Σ_j x_j        (the same products as Σ (d · q_j + m) x_j, grouped so
                                                                 that d multiplies 16 lanes at once; m's sums of x are
                                                                 shared by every output row)

        The codes are widened to int32 before their nibbles are cut: AVX-512 shifts 32-bit lanes, not bytes."""
        N, nb = x.shape[0], self.in_features // 32
        d = self.scale[None, :, :, None]  # (1, out, blocks, 1)
        xg = x.view(N, 1, nb, 2, 16)  # each block's first 16 inputs (low nibbles) and last 16 (high nibbles)
        if self.kind == "Q8_0":  # the block's two halves added first, so d multiplies once per 16 lanes: 2.7x faster
            c = self.codes.view(self.out_features, nb, 2, 16)[None]  # (1, out, blocks, 2, 16)
            return ((c[..., 0, :].float() * xg[:, :, :, 0] + c[..., 1, :].float() * xg[:, :, :, 1]) * d).sum((-1, -2))
        c = self.codes.to(torch.int32)[None]  # (1, out, blocks, 16)
        qx = (c & 15).float() * xg[:, :, :, 0] + (c >> 4).float() * xg[:, :, :, 1]  # (N, out, blocks, 16)
        return (qx * d).sum((-1, -2)) + (xg.sum((-1, -2)) * self.minimum[None]).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= GEMV_ROWS and x.dtype == torch.float32 and torch.compiler.is_compiling():
            y = self._from_blocks(x.reshape(rows, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.parts is not None:
            return torch.cat([p(x) for p in self.parts], -1)
        return F.linear(x, self.weight, self.bias)


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthogonal (n, n) matrix (Haar-distributed: QR of a Gaussian with the signs made unique)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def int4_codes(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in) in 0..15, scale (out, in/group), min (out, in/group)) of a float matrix, Q4_1's rounding:
    each group of `group` inputs maps [min, max] onto 16 levels."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, in/group)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out, inp)
    return codes, scale, lo


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32 (llama.cpp's Q4_1 rounding), packed for PyTorch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        codes, scale, lo = int4_codes(linear.weight.detach(), group)
        self.group = group
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the kernel computes w = (q - 8) · scale + zero with (scale, zero) per group, stored (in/group, out, 2) in bf16
        zero = lo + 8 * scale
        self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        # two codes a byte, for `dequantized` and devices without the kernel (the kernel's packing is its own)
        self.register_buffer("codes", (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8))
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def supports(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
        """The kernel's shapes: inputs a multiple of the group, outputs a multiple of 16 (else int8 is used)."""
        kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        return kernel and linear.in_features % group == 0 and linear.out_features % 16 == 0 and linear.weight.is_cpu

    def dequantized(self) -> torch.Tensor:
        sz = self.scale_zero.float().transpose(0, 1)  # (out, in/group, 2)
        codes = torch.stack([self.codes & 15, self.codes >> 4], -1).reshape(self.out_features, self.in_features)
        q = codes.float().reshape(self.out_features, -1, self.group) - 8
        return (q * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (N, in)
        if x.device.type == "cpu" and x2.requires_grad:  # QLoRA: gradients flow to the input through the frozen weights
            y = _Int4MatMul.apply(x2, self)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group, self.scale_zero)  # (N, out)
        else:
            y = F.linear(x2, self.dequantized().to(torch.bfloat16))
        # as nn.Linear would: the autocast dtype under autocast (training's activations stay half the bytes), else x's
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        y = y.to(dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _Int4MatMul(torch.autograd.Function):
    """x W^T through the int4 kernel, and the gradient to x (grad_y W, with W dequantized in bf16 for the moment):
    the frozen 4-bit base of QLoRA (Dettmers et al. 2023), whose weights get no gradient."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: Int4Linear) -> torch.Tensor:  # (N, in) -> (N, out)
        ctx.layer = layer
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.weight_int4, layer.group, layer.scale_zero)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # (N, out) -> (N, in)
        w = ctx.layer.dequantized().to(torch.bfloat16)  # (out, in)
        return grad_y.to(torch.bfloat16) @ w, None


FROZEN_4BIT = ("int4", "nf4")  # QLoRA's base: llmkit's int4 kernel on a CPU, bitsandbytes' NF4 on CUDA


def quantize_frozen(model: nn.Module, method: str = "int4") -> int:
    """QLoRA's base: every linear layer of the blocks (the LM head, embeddings and norms stay as they are) frozen in 4
    bits, in place and unfused (LoRA and PEFT's names still find q_proj, ...). On a CPU llmkit's int4 kernel (groups of
    32, Q4_1's rounding; a layer it cannot take stays float); on CUDA bitsandbytes' NF4 with double quantization and
    bf16 compute (Dettmers et al. 2023). Returns the number of layers quantized."""
    if method not in FROZEN_4BIT:
        raise LlmkitError(f"unknown 4-bit base {method!r}", f"use one of: {', '.join(FROZEN_4BIT)}")
    device = next(model.parameters()).device
    make = _nf4_linear if device.type == "cuda" else None
    if device.type not in ("cpu", "cuda"):
        raise LlmkitError(f"QLoRA has no 4-bit backend on {device.type}", "use --method lora there, or --device cpu")
    if make is None and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise LlmkitError(
            "this PyTorch has no CPU int4 kernel (_weight_int4pack_mm_for_cpu)", "upgrade torch (>= 2.5), or use --method lora"
        )
    from llmkit.model.layers import MLP, Attention

    count = 0
    for module in list(model.modules()):
        if not isinstance(module, (Attention, MLP)):  # the blocks' projections only: heads, poolers and classifiers stay
            continue
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if make is not None:
                setattr(module, child_name, make(child))
            elif Int4Linear.supports(child):
                setattr(module, child_name, Int4Linear(child))
            else:
                continue
            count += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return count


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit (NF4, double quantization, bf16 compute) holding `linear`'s weights, on its GPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LlmkitError("QLoRA on CUDA needs bitsandbytes (NF4)", "pip install bitsandbytes, or use --method lora") from None
    from llmkit.devices import default_dtype

    compute = default_dtype(linear.weight.device)  # bf16 on GPUs that have it, else fp16
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",  # no throwaway float weight: the real one comes next
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().cpu().float(), requires_grad=False, quant_type="nf4", compress_statistics=True, module=layer
    )  # `module`: the layer keeps its quantization state (as transformers builds it)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # quantized as it moves to the GPU


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None)
    fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))  # type: ignore[misc]
    fused.weight.requires_grad_(False)
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Merge each self-attention's q/k/v projections into one `qkv_proj` and each gated MLP's gate/up projections into
    one `gate_up_proj` (in place; for inference: the merged weights are copies). The outputs are the same numbers."""
    from llmkit.model.layers import MLP, Attention

    for module in model.modules():
        if isinstance(module, Attention) and module.q_proj is not None and module.self_attention:
            module.qkv_proj = _fused_linear([module.q_proj, module.k_proj, module.v_proj])
            module.q_proj = module.k_proj = module.v_proj = None
        elif isinstance(module, MLP) and module.gate_proj is not None:
            module.gate_up_proj = _fused_linear([module.gate_proj, module.up_proj])
            module.gate_proj = module.up_proj = None
    return model


def use_gguf_blocks(model: nn.Module) -> nn.Module:
    """Give every linear layer whose weights came from a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks those blocks
    (`BlockLinear`, in place; for inference): the same float32 weights, read from half a byte each by the compiled
    decode step. q/k/v and gate/up get one BlockLinear each over their stacked blocks (`qkv_proj`, `gate_up_proj`;
    the separate layers stay for the eager path). Layers without blocks (float tensors in the file) stay as they are.
    Each change is one assignment of a finished module that computes what was computed before, so a thread may do
    this while another decodes eagerly."""
    from llmkit.model.layers import MLP, Attention

    source = getattr(model, "gguf_blocks", None)
    if source is None:
        raise LlmkitError("this model was not loaded from a GGUF file with quantized blocks", "use --quantize none, int8 or int4")
    if next(model.parameters()).dtype != torch.float32:
        raise LlmkitError(
            "the GGUF blocks decode in float32, and this model was cast", "load it in float32 (--dtype fp32), or --quantize none"
        )
    blocks = source.read()
    tied = model.config.tie_embeddings
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                key = "embed.tokens.weight" if name == "lm_head" and tied else f"{name}.weight"
                if key in blocks:
                    module.gguf_block = blocks[key]
        swaps = []  # every layer checked against its blocks first: a refusal leaves the model as it was
        for module in list(model.modules()):
            if isinstance(module, Attention) and module.self_attention and module.qkv_proj is None:
                slot, group = "qkv_proj", [module.q_proj, module.k_proj, module.v_proj]
            elif isinstance(module, MLP) and module.gate_proj is not None and module.gate_up_proj is None:
                slot, group = "gate_up_proj", [module.gate_proj, module.up_proj]
            else:
                continue
            tags = [getattr(p, "gguf_block", None) for p in group]
            if all(isinstance(p, nn.Linear) and t is not None and t[0] == tags[0][0] for p, t in zip(group, tags)):
                swaps.append((module, slot, BlockLinear(group, tags[0][0], torch.cat([t[1] for t in tags]))))
                for p in group:
                    del p.gguf_block  # stacked: the layers themselves stay float
        stacked = {id(p) for m in model.modules() if isinstance(m, BlockLinear) and m.parts is not None for p in m.parts}
        swaps += [  # (a second call finds the stacked ones' float parts: they stay float)
            (module, child_name, BlockLinear(child, *child.gguf_block))
            for module in list(model.modules())
            for child_name, child in list(module.named_children())
            if isinstance(child, nn.Linear) and getattr(child, "gguf_block", None) is not None and id(child) not in stacked
        ]
    finally:
        for module in model.modules():
            if hasattr(module, "gguf_block"):
                del module.gguf_block
    for module, child_name, block in swaps:
        setattr(module, child_name, block)
    model.eval()
    return model


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Fuse the projections, then replace every nn.Linear of `model` by its quantized form (in place; for inference
    only): the GGUF file's own blocks ("gguf", exact), int8 weights, or int4 weights with the head at int8 × int8
    after a rotation."""
    if method not in METHODS:
        raise LlmkitError(f"unknown quantization {method!r}", f"use one of: {', '.join(METHODS)}")
    if method == "gguf":
        return use_gguf_blocks(model)
    fuse_projections(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                head = name == "" and child_name == "lm_head"
                four = method == "int4" and Int4Linear.supports(child) and not head
                a8 = "int8" if method == "int4" and head else "bf16"  # int4's head: int8 × int8 after a rotation
                setattr(module, child_name, Int4Linear(child) if four else Int8Linear(child, activations=a8))
    model.eval()
    return model
