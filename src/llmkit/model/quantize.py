"""Weight-only int8 quantization for fast CPU decoding.

Decoding one token reads every weight once, so its speed is set by memory traffic and per-op overhead, not FLOPs.
Each `nn.Linear` becomes an `Int8Linear`: symmetric per-output-channel int8 weights (w ≈ q · scale, q in [-127, 127])
multiplied by bf16 activations in PyTorch's `_weight_int8pack_mm` kernel; the activations and everything else stay
as they were. Embedding tables are left alone (a lookup reads one row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._kernel = hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (N, in)
        if self._kernel and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)  # (N, out)
        else:
            y = F.linear(x2, self.weight_int8.to(torch.bfloat16) * self.scale[:, None])
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` by its weight-only quantized form (in place; for inference only)."""
    if method != "int8":
        raise LlmkitError(f"unknown quantization {method!r}", "use int8")
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    model.eval()
    return model
