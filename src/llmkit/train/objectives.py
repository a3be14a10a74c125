"""The three pretraining objectives, each a small function from token windows to model inputs and targets.
Targets use -100 for "no loss here" (PyTorch's `ignore_index`).

Causal LM (decoders): predict each next token.

    window   The teacher teaches the student
    input    The teacher teaches the
    target   teacher teaches the student

Masked LM (encoders; Devlin et al. 2019): pick 15% of the non-special tokens; of those 80% become <mask>,
10% a random token, 10% stay; the loss is on the picked positions only.

    input    The <mask> teaches the student        (one of the picked tokens, masked)
    target   -    teacher -     -   -

Span corruption (encoder-decoders; Raffel et al. 2020): noise density 0.15, mean span length 3; each span is
replaced by a sentinel in the input, and the target lists sentinel + span in order, ending with a last sentinel.

    input    The teacher <X> student                       (<X> = <extra_id_0>, <Y> = <extra_id_1>)
    target   <X> teaches the <Y>
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def causal_lm(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """windows (B, T+1) -> inputs (B, T), targets (B, T)."""
    return windows[:, :-1], windows[:, 1:]


def masked_lm(
    windows: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int] | list[int],
    generator: torch.Generator,
    rate: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """windows (B, T) -> corrupted inputs (B, T), targets (B, T) (-100 where not picked). Special tokens are never picked."""
    special = torch.tensor(sorted(special_ids), dtype=windows.dtype)
    maskable = ~torch.isin(windows, special)  # (B, T)
    picked = (torch.rand(windows.shape, generator=generator) < rate) & maskable
    targets = torch.where(picked, windows, torch.full_like(windows, IGNORE))
    roll = torch.rand(windows.shape, generator=generator)
    inputs = windows.clone()
    inputs[picked & (roll < 0.8)] = mask_id
    random_slots = picked & (roll >= 0.8) & (roll < 0.9)
    inputs[random_slots] = _random_tokens(int(random_slots.sum()), vocab_size, special, generator)
    return inputs, targets


def _random_tokens(n: int, vocab_size: int, special: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """n random non-special token ids."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    choices = allowed.nonzero().squeeze(1)
    return choices[torch.randint(len(choices), (n,), generator=generator)]


def _span_mask(length: int, rng: np.random.Generator, density: float, mean_span: float) -> np.ndarray:
    """T5's random_spans_noise_mask: a boolean mask of `length` with about `density` of it in spans of mean `mean_span`,
    noise and non-noise spans alternating, starting with non-noise."""
    n_noise = int(round(length * density))
    n_noise = min(max(n_noise, 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    n_keep = length - n_noise

    def segments(total: int, n: int) -> np.ndarray:  # split `total` into n positive parts at random
        cuts = np.sort(rng.choice(np.arange(1, total), size=n - 1, replace=False)) if n > 1 else np.array([], dtype=int)
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise_lengths, keep_lengths = segments(n_noise, n_spans), segments(n_keep, n_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_lengths, noise_lengths):
        pos += keep
        mask[pos : pos + noise] = True
        pos += noise
    return mask


def span_corruption(
    windows: torch.Tensor,
    *,
    sentinel_ids: list[int],
    eos_id: int | None,
    pad_id: int,
    rng: np.random.Generator,
    density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """windows (B, T) -> encoder inputs (B, S) and decoder targets (B, U), padded with `pad_id` (targets with -100).

    Each noise span becomes the next sentinel in the input; the target is sentinel, span, sentinel, span, ..., final
    sentinel (and eos when the tokenizer has one).
    """
    inputs, targets = [], []
    for row in windows.tolist():
        mask = _span_mask(len(row), rng, density, mean_span)
        n_spans = int(np.sum(mask[1:] & ~mask[:-1]) + mask[0])
        if n_spans + 1 > len(sentinel_ids):
            raise ValueError(f"{n_spans} spans need {n_spans + 1} sentinels; the tokenizer has {len(sentinel_ids)}")
        inp, tgt, k, prev = [], [], 0, False
        for tok, noise in zip(row, mask):
            if noise and not prev:
                inp.append(sentinel_ids[k])
                tgt.append(sentinel_ids[k])
                k += 1
            (tgt if noise else inp).append(tok)
            prev = noise
        tgt.append(sentinel_ids[k])
        if eos_id is not None:
            inp.append(eos_id)
            tgt.append(eos_id)
        inputs.append(inp)
        targets.append(tgt)
    S, U = max(map(len, inputs)), max(map(len, targets))
    enc = torch.full((len(inputs), S), pad_id, dtype=torch.long)
    out = torch.full((len(targets), U), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(zip(inputs, targets)):
        enc[i, : len(a)] = torch.tensor(a)
        out[i, : len(b)] = torch.tensor(b)
    return enc, out


def shift_right(targets: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start] + targets[:-1], with -100 replaced by pad."""
    dec = torch.full_like(targets, pad_id)
    dec[:, 0] = start_id
    dec[:, 1:] = targets[:, :-1]
    return dec.masked_fill(dec == IGNORE, pad_id)
