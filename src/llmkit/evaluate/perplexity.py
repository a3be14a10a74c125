"""Perplexity and bits per byte of a decoder on a token stream: the one evaluation the trainer and
`llmkit eval perplexity` share.

Windows of N tokens start every S tokens. With S = N (no overlap) each window scores every token but its first,
which has no context. With S < N every token after the first of the stream is scored exactly once, by the first
window that holds it with context before it:

    stream   t0 t1 t2 t3 t4 t5 t6 t7 t8          N = 4, S = 2
    window   [t0 t1 t2 t3]                        scores t1 t2 t3
                   [t2 t3 t4 t5]                  scores t4 t5 (t3 was scored with less context)
                         [t4 t5 t6 t7]            scores t6 t7
                               [t6 t7 t8]         scores t8

nats/token is the mean negative log-likelihood; perplexity = exp(nats/token); bits per byte = total nats / ln 2 /
the UTF-8 bytes of the text scored, which compares models across tokenizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmkit.progress import progress


def window_plan(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) of each window: the last n_scored tokens of [start, end) are scored."""
    stride = stride or window
    if stride > window:
        raise ValueError("the stride cannot be longer than the window")
    plan, scored_to = [], 1  # token 0 has no context
    start = 0
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        if end - start >= 2 and end > scored_to:
            plan.append((start, end, end - max(scored_to, start + 1)))
            scored_to = end
        if end == n_tokens:
            break
        start += stride
    return plan


@torch.no_grad()
def score_tokens(
    model, ids, window: int, stride: int | None = None, *, batch_size: int = 8, max_windows: int | None = None, autocast_dtype=None
) -> tuple[float, int]:
    """(total nats, tokens scored) of a decoder on the 1-D token sequence `ids`."""
    device = next(model.parameters()).device
    host = torch.device("cpu")  # each batch is built in host memory, then copied to the model's device once
    ids = torch.as_tensor(ids, dtype=torch.long, device=host)
    plan = window_plan(len(ids), window, stride)[:max_windows]
    nats, count = 0.0, 0
    with progress("windows", disable=None if len(plan) > batch_size else True) as bar:
        task = bar.add_task("score", total=len(plan))
        for i in range(0, len(plan), batch_size):
            nats_i, count_i = _score_group(model, ids, plan[i : i + batch_size], device, host, autocast_dtype)
            nats, count = nats + nats_i, count + count_i
            bar.update(task, completed=min(i + batch_size, len(plan)))
    return nats, count


def _score_group(model, ids, group, device, host, autocast_dtype) -> tuple[float, int]:
    """(nats, tokens scored) of one batch of windows (start, end, tokens to score) of `ids`."""
    width = max(e - s for s, e, _ in group) - 1  # a window of N tokens is N - 1 inputs predicting N - 1 next tokens
    x = torch.zeros(len(group), width, dtype=torch.long, device=host)
    targets = torch.full((len(group), width), -100, dtype=torch.long, device=host)
    for r, (s, e, n) in enumerate(group):
        x[r, : e - s - 1] = ids[s : e - 1]
        targets[r, e - s - 1 - n : e - s - 1] = ids[e - n : e]  # input position p predicts token p + 1
    x, targets = x.to(device), targets.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(x)  # (b, width, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss.item(), int((targets != -100).sum())


def summarize(nats: float, tokens: int, n_bytes: float) -> dict:
    per_token = nats / max(tokens, 1)
    return {
        "tokens": tokens,
        "nats_per_token": per_token,
        "perplexity": math.exp(min(per_token, 700)),
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1e-9),
        "bytes": n_bytes,
    }


def evaluate_text(
    model,
    tokenizer,
    text: str,
    window: int,
    stride: int | None = None,
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    prefix_id: int | None = None,
) -> dict:
    """tokens, nats/token, perplexity and bits per byte of a decoder on `text` (its first `max_tokens` tokens).

    `prefix_id` puts one token (bos, or eos as lm-eval's rolling log-likelihood does) before the text so that its first
    token is scored too; with `window` = L + 1 and `stride` = L this is lm-eval's `loglikelihood_rolling` at context L."""
    from llmkit.errors import LlmkitError

    ids = tokenizer.encode(text)  # with the tokenizer's own special tokens (Llama's bos), as transformers' perplexity does
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if prefix_id is not None and ids[:1] != [prefix_id]:
        ids = [prefix_id] + ids
    if len(ids) < 2:
        raise LlmkitError("the text has fewer than 2 tokens", "give a longer text")
    nats, count = score_tokens(model, ids, window, stride, batch_size=batch_size)
    n_bytes = len(text.encode("utf-8")) * count / max(len(ids) - 1, 1)  # the bytes of the scored share of the text
    return {**summarize(nats, count, n_bytes), "nats": nats}
