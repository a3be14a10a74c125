"""Encoders as classifiers and regressors: a head on the mean-pooled sentence embedding, sentence pairs as
`[CLS] a [SEP] b [SEP]` with token types, and the run folder a fine-tuning writes loaded back for prediction.

    text (, text_pair) ──► encoder (+ LoRA / adapters) ──► mean pooling ──► Linear ──► class logits | a score (regression)

A fine-tuned classifier's run folder holds `finetune_config.json` (the base model and the method), `labels.json`
(the classes, or ["<regression>"]) and `classifier.safetensors` (every trained tensor: LoRA / adapter weights or the
whole encoder, and the head); `load_classifier(run)` rebuilds it on the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model.convert.tensors import read_safetensors
from llmkit.model.families import LanguageModel
from llmkit.model.layers import pad_right
from llmkit.model.lora import METHOD_FIELDS, apply_method
from llmkit.model.weights import load

REGRESSION = "<regression>"


class Classifier(LanguageModel):
    """An encoder with a head on its mean-pooled sentence embedding: len(labels) logits, or one score for regression."""

    def __init__(self, encoder, labels: list[str]):
        super().__init__()
        self.encoder, self.labels = encoder, labels
        self.config = encoder.config
        self.regression = labels == [REGRESSION]
        self.head = torch.nn.Linear(encoder.config.d_model, len(labels))

    def forward(self, ids, mask, token_type_ids=None):
        pooled = self.encoder.embed_sentences(ids, mask, pooling="mean", normalize=False, token_type_ids=token_type_ids)
        return self.head(pooled)  # (B, n_labels), (B, 1) for regression

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed loss: cross-entropy over classes, or squared error for regression."""
        if self.regression:
            return F.mse_loss(logits.float()[:, 0], targets.float(), reduction="sum")
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def encode_rows(tok, examples, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, token types) of each example: a text, or a pair cut longest-first to fit `max_length`."""
    ids, types = [], []
    for ex in examples:
        pair = getattr(ex, "text_pair", None)
        if pair is None:
            row = tok.encode(ex.text, max_length=max_length)
            ids.append(row)
            types.append([0] * len(row))
        else:
            row, kinds = tok.encode_pair(ex.text, pair, max_length=max_length)
            ids.append(row)
            types.append(kinds)
    return ids, types


def batch_tensors(ids: list[list[int]], types: list[list[int]], pad_id: int, device=None):
    """Right-padded (ids, attention mask, token types), each (B, T), on `device`."""
    x, mask = pad_right(ids, pad_id, device)
    t, _ = pad_right(types, 0, device)
    return x, mask, t


@torch.no_grad()
def predict(model: Classifier, tok, examples, batch: int = 32) -> torch.Tensor:
    """(N, n_labels) class probabilities, or (N,) scores for regression."""
    model.eval()
    ids, types = encode_rows(tok, examples, model.config.max_seq_len)
    out = []
    for i in range(0, len(ids), batch):
        x, mask, t = batch_tensors(ids[i : i + batch], types[i : i + batch], tok.pad_id or 0, next(model.parameters()).device)
        logits = model(x, mask, t).float()
        out.append(logits[:, 0] if model.regression else logits.softmax(-1))
    return torch.cat(out)


def save_classifier(model: Classifier, run: Path) -> None:
    from safetensors.torch import save

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with io.atomic_open(run / "classifier.safetensors", "wb") as f:
        f.write(save(state))
    io.write_json(run / "labels.json", model.labels)


def load_classifier(run: str | Path, device=None) -> Classifier:
    """A classifier fine-tuned by `llmkit finetune` (a run folder with classifier.safetensors), ready to predict."""
    run = Path(run)
    for name in ("classifier.safetensors", "labels.json", "finetune_config.json"):
        if not (run / name).exists():
            raise LlmkitError(
                f"{run} has no {name}: it is not a classifier run of `llmkit finetune`",
                "fine-tune an encoder on labelled rows first (llmkit finetune --model minilm --data rows.jsonl)",
            )
    cfg = io.read_json(run / "finetune_config.json")
    encoder = load(cfg["model"], device=device)
    tok = encoder.tokenizer
    model = Classifier(encoder, io.read_json(run / "labels.json"))
    method = "lora" if cfg["method"] == "qlora" else cfg["method"]  # a QLoRA run's adapters load on the float base
    apply_method(model.encoder, method, **{k: cfg[k] for k in METHOD_FIELDS if k in cfg})
    state = read_safetensors(run / "classifier.safetensors")
    own = dict(model.named_parameters())
    missing = [k for k in state if k not in own]
    if missing:
        raise LlmkitError(f"{run}/classifier.safetensors holds tensors this model lacks ({missing[:3]})", "re-run the fine-tuning")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    model.tokenizer = tok
    return model.eval()
