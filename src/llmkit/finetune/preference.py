"""Learning from preferences: pairs of answers to one prompt, the chosen one over the rejected one.

    rows     {"prompt", "system"?, "chosen", "rejected"} (trl's plain layout; `llmkit eval arena --export-pairs`
             writes it), or trl's conversational one: "prompt" a list of messages, "chosen"/"rejected" one-message lists
    logps    log p(answer | prompt) summed over the answer's tokens (rendered through the chat template, as SFT trains)

    DPO (Rafailov et al. 2023)   h = β · [(log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r))]
                                 loss = −(1 − ε) · log σ(h) − ε · log σ(−h)          ε: --label-smoothing (cDPO)
    IPO (Azar et al. 2023)       the same difference of log-ratios with each logp averaged over its answer's tokens,
                                 loss = (h/β − 1/(2β))²
    ORPO (Hong et al. 2024)      no reference: with p the per-token average probability of an answer,
                                 loss = NLL(chosen) − λ · log σ(log odds(c) − log odds(r)),  odds(p) = p / (1 − p)

The reference of DPO/IPO is the model before training: with LoRA the same weights with the adapters switched off
(`reference_mode`), so no second copy; with full fine-tuning a frozen copy. Metrics are named as trl names them:
rewards/chosen = β (log π(c) − log π_ref(c)), rewards/rejected, rewards/margins, rewards/accuracies (chosen above
rejected); ORPO's rewards are β · the answers' average log-probabilities, as trl's ORPOTrainer logs them.

`build_pairs` makes pairs without a person: a model's own sampled answers to a built-in task's questions, sorted into
right and wrong by the task's verifier (`llmkit finetune pairs`, and the pairs of `finetune compare`'s dpo rows).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.finetune.data import IGNORE, encode_chat
from llmkit.model.layers import pad_right

PREFERENCE_METHODS = ("dpo", "ipo", "orpo")
MIN_PAIRS = 4  # fewer pairs than this train nothing worth measuring (a tenth of the prompts is held out)


def is_pair_row(row: dict) -> bool:
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


@dataclass
class Pair:
    prompt: list[dict]  # the conversation before the answer
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)


def _text(side) -> str:
    """An answer given as a string or as trl's one-message list."""
    if isinstance(side, list):
        side = side[-1].get("content", "") if side and isinstance(side[-1], dict) else ""
    return "" if side is None else str(side)


def read_pairs(rows: list[dict]) -> tuple[list[Pair], dict[str, int]]:
    """Pairs of the rows, and the count of each kind of row left out (never trained on): a missing or empty side,
    chosen equal to rejected, a missing prompt."""
    pairs, skipped = [], {"missing side": 0, "empty side": 0, "chosen = rejected": 0, "no prompt": 0}
    for row in rows:
        if not is_pair_row(row):
            skipped["missing side"] += 1
            continue
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            messages = [m for m in prompt if isinstance(m, dict)]
        elif prompt:
            messages = ([{"role": "system", "content": str(row["system"])}] if row.get("system") else []) + [
                {"role": "user", "content": str(prompt)}
            ]
        else:
            messages = []
        chosen, rejected = _text(row["chosen"]), _text(row["rejected"])
        if not messages:
            skipped["no prompt"] += 1
        elif not chosen.strip() or not rejected.strip():
            skipped["empty side"] += 1
        elif chosen.strip() == rejected.strip():
            skipped["chosen = rejected"] += 1
        else:
            meta = {k: row[k] for k in ("battle_id", "chosen_model", "rejected_model") if k in row}
            pairs.append(Pair(messages, chosen, rejected, meta))
    return pairs, {k: v for k, v in skipped.items() if v}


@dataclass
class EncodedPairs:
    """Each pair as two (ids, labels) rows, chosen first; labels cover the answer only."""

    chosen: list[tuple[list[int], list[int]]]
    rejected: list[tuple[list[int], list[int]]]
    too_long: int = 0


def encode_pairs(tokenizer, pairs: list[Pair], max_len: int) -> EncodedPairs:
    """Render each side through the chat template (the loss mask on the answer, as SFT's); a pair whose longer side
    exceeds `max_len` is left out and counted."""
    out = EncodedPairs([], [])
    for p in pairs:
        c = encode_chat(tokenizer, p.prompt + [{"role": "assistant", "content": p.chosen}], last_only=True)
        r = encode_chat(tokenizer, p.prompt + [{"role": "assistant", "content": p.rejected}], last_only=True)
        if max(len(c[0]), len(r[0])) > max_len:
            out.too_long += 1
            continue
        out.chosen.append(c)
        out.rejected.append(r)
    return out


def pair_batch(encoded: EncodedPairs, rows: list[int], pad_id: int, device=None):
    """(ids, attention mask, labels) of rows' pairs: the chosen answers in the first half, the rejected in the second."""
    seqs = [encoded.chosen[i] for i in rows] + [encoded.rejected[i] for i in rows]
    x, mask = pad_right([s[0] for s in seqs], pad_id, device)
    y, _ = pad_right([s[1] for s in seqs], IGNORE, device)
    return x, mask, y


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each next label (B, T-1), mask of the labels that count (B, T-1)) from logits (B, T, V) and
    labels (B, T) with IGNORE where no loss goes; position t predicts token t + 1."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = (target != IGNORE).float()
    logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp, mask


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's answer tokens (B,), their count (B,)): `token_logps` summed over a row."""
    logp, mask = token_logps(logits, labels)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) of DPO ("sigmoid") or IPO ("ipo") from the answers' log-ratios
    log π(y) − log π_ref(y) (summed over their tokens). IPO divides each by its answer's length (`lengths`: chosen,
    rejected), as trl does with the IPO authors' agreement; the rewards are β times the summed log-ratios."""
    if loss_type == "sigmoid":
        delta = chosen_logratios - rejected_logratios
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "ipo":
        if lengths is None:
            raise ValueError("IPO needs the answers' lengths")
        delta = chosen_logratios / lengths[0].clamp(min=1) - rejected_logratios / lengths[1].clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise LlmkitError(f"unknown DPO loss {loss_type!r}", "use sigmoid (DPO) or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0, log1p(−eˣ) below −ln 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(odds-ratio term per pair, chosen reward, rejected reward) of ORPO from the answers' average log-probabilities:
    −λ log σ(log odds(c) − log odds(r)); the NLL of the chosen answers is added by the caller."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module, reference: torch.nn.Module | None = None):
    """The reference model of DPO: `reference` when given (full fine-tuning's frozen copy), else `model` with every
    LoRA adapter switched off (the base it started from), in no-grad mode."""
    from llmkit.model.lora import lora_layers

    if reference is not None:
        with torch.no_grad():
            yield reference
        return
    layers = list(lora_layers(model).values())
    if not layers:
        raise LlmkitError("DPO without a reference copy needs LoRA adapters", "use LoRA (the default), or full fine-tuning")
    if any(layer.merged for layer in layers):
        raise LlmkitError("the LoRA adapters are merged: switching them off would not give the base", "unmerge them first")
    training = model.training
    for layer in layers:
        layer.disabled = True
    model.eval()  # no dropout in the reference's log-probabilities
    try:
        with torch.no_grad():
            yield model
    finally:
        for layer in layers:
            layer.disabled = False
        model.train(training)


@dataclass
class PreferenceLoss:
    """One method's loss over a batch of pairs: `__call__(model, x, mask, labels)` returns (summed loss over the pairs,
    their metrics summed: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, and for ORPO nll)."""

    method: str  # dpo | ipo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.method not in PREFERENCE_METHODS:
            raise LlmkitError(f"unknown preference method {self.method!r}", f"use one of {', '.join(PREFERENCE_METHODS)}")
        if not self.beta > 0:
            raise LlmkitError(f"--beta {self.beta} must be above 0", "e.g. --beta 0.1 (DPO) or --beta 0.1 (ORPO's λ)")
        if not 0 <= self.label_smoothing < 0.5:
            raise LlmkitError(f"--label-smoothing {self.label_smoothing} must be in [0, 0.5)", "e.g. 0.1, or 0 (plain DPO)")

    def __call__(self, model, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, forward=None):
        forward = forward or model
        n = x.shape[0] // 2
        logits = forward(x, attention_mask=mask)
        sums, counts = answer_logps(logits, labels)  # (2n,)
        if self.method == "orpo":
            logps = sums / counts.clamp(min=1)  # the answers' average log-probabilities
            odds, r_c, r_r = orpo_losses(logps[:n], logps[n:], self.beta)
            nll = -sums[:n] / counts[:n].clamp(min=1)  # the chosen answers' mean token NLL, per pair
            losses = nll + odds
            extra = {"nll_loss": nll.detach().sum().item(), "log_odds_ratio": (-odds / self.beta).detach().sum().item()}
        else:
            with reference_mode(model, self.reference) as ref:
                ref_sums, _ = answer_logps(ref(x, attention_mask=mask), labels)
            ratios = sums - ref_sums  # (2n,) log π(y) − log π_ref(y)
            loss_type = "ipo" if self.method == "ipo" else "sigmoid"
            losses, r_c, r_r = dpo_losses(ratios[:n], ratios[n:], self.beta, loss_type, self.label_smoothing, (counts[:n], counts[n:]))
            extra = {}
        metrics = {
            "logps/chosen": sums[:n].detach().sum().item(),
            "logps/rejected": sums[n:].detach().sum().item(),
            "rewards/chosen": r_c.sum().item(),
            "rewards/rejected": r_r.sum().item(),
            "rewards/margins": (r_c - r_r).sum().item(),
            "rewards/accuracies": (r_c > r_r).float().sum().item(),
            **extra,
        }
        return losses.sum(), metrics


# --- a preference set the toolkit builds itself ---------------------------------------------------------------------


def build_pairs(
    model,
    task: str,
    *,
    prompts: int = 160,
    samples: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch: int = 16,
    device=None,
    log=print,
) -> tuple[list[dict], dict]:
    """Preference pairs judged by a program, no human: `model` (a loaded model, or a name or folder `llmkit.load` takes,
    loaded on `device`) samples `samples` answers (through its chat template) to
    each of `prompts` questions of a built-in task with a verifier (its training split), the verifier (the exact
    answer) sorts them into right and wrong, and each question with both gives one pair {"prompt", "chosen" (a right
    one), "rejected" (a wrong one)}. Returns the pairs and the counts (questions, answers, right, pairs)."""
    import random

    from llmkit.chat import chat_prompt_ids
    from llmkit.data import tasks as T
    from llmkit.generate import GenerationConfig, generate
    from llmkit.progress import progress

    if task not in T.VERIFIED:
        raise LlmkitError(f"--task {task} has no verifier to judge answers", f"use one of {', '.join(T.VERIFIED)}")
    if samples < 2:
        raise LlmkitError(f"--samples {samples}: a pair needs two answers to one question", "use --samples 4 (or more)")
    if isinstance(model, (str, os.PathLike)):
        from llmkit.model.weights import load

        model = load(model, device=device)
    tok = model.tokenizer
    examples = T.task_examples(task, prompts, "train", seed)
    questions = [ex.messages or [] for ex in examples]  # the built-in tasks' examples are chats
    ids = [chat_prompt_ids(tok, m[:-1]) for m in questions]
    answers: list[list[str]] = [[] for _ in examples]
    with progress("answers") as bar:
        work = bar.add_task(f"sampling {samples} answers to {len(ids)} questions", total=samples * len(ids))
        for k in range(samples):
            for i in range(0, len(ids), batch):
                cfg = GenerationConfig(
                    max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, seed=seed * 7919 + 1000 * k + i
                )
                for j, g in enumerate(generate(model, tok, ids[i : i + batch], cfg, warn=lambda m: None)):
                    answers[i + j].append(g.text.strip())
                bar.advance(work, len(ids[i : i + batch]))
    rng = random.Random(seed)
    pairs, right = [], 0
    for ex, chat, got in zip(examples, questions, answers):
        good = [a for a in got if T.normalize_answer(a) == T.normalize_answer(ex.answer or "")]
        bad = [a for a in got if a and T.normalize_answer(a) != T.normalize_answer(ex.answer or "")]
        right += len(good)
        if good and bad:
            pairs.append({"prompt": chat[-2]["content"], "chosen": rng.choice(good), "rejected": rng.choice(bad)})
    counts = {"questions": len(examples), "answers": len(examples) * samples, "right": right, "pairs": len(pairs)}
    log(f"{counts['questions']} questions x {samples} answers: {right} right; {len(pairs)} with a right and a wrong answer (the pairs)")
    if 0 < len(pairs) < MIN_PAIRS:
        log(
            f"warning: {len(pairs)} pair(s) are too few to train on (DPO holds out whole prompts and needs {MIN_PAIRS} or more): "
            "raise --prompts, or fine-tune the model longer first"
        )
    return pairs, counts
