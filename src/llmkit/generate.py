"""Sampling from a decoder with its KV cache: greedy, temperature, top-k.

The cache is preallocated to prompt + new tokens, so decoding never re-allocates.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int = 100, *, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None, stop_ids: set[int] | None = None) -> list[int]:
    """New token ids continuing `prompt_ids` (temperature 0 = greedy)."""
    cfg = model.config
    device = next(model.parameters()).device
    prompt_ids = prompt_ids[-(cfg.max_seq_len - max_new_tokens):] if cfg.max_seq_len > max_new_tokens else prompt_ids[-1:]
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens, dtype=torch.float32)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]  # (V,)
    out = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            scores = logits.float() / temperature
            if top_k:
                kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            nxt = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        out.append(nxt)
        if stop_ids and nxt in stop_ids:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
    return out
