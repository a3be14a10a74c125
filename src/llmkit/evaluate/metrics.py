"""Every metric of the course, each computed by the library the field trusts for it, with seeded bootstrap intervals.

    classification   accuracy, precision / recall / F1 (binary, macro, micro, weighted), Matthews correlation (mcc),
                     ROC-AUC (binary, or one-vs-rest macro from per-class scores), PR-AUC (average precision), and the
                     confusion matrix                                                          scikit-learn
    regression       Pearson and Spearman correlation                                          scipy
    generation       BLEU, chrF, chrF++ and TER (corpus level, 0-100, with sacrebleu's signature)  sacrebleu
                     ROUGE-1/2/L/Lsum (F1, Porter stemming, best over references)              rouge-score
                     METEOR (mean over sentences; WordNet from a local copy)                   nltk
                     exact match and token F1 (SQuAD's normalization, best over references)    written here, as SQuAD's script

A bootstrap interval resamples the examples with replacement N times (seeded), recomputes the metric on each sample
(the corpus-level ones too) and reports the 2.5th and 97.5th percentiles: a number from 48 examples carries its
uncertainty with it.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmkit.errors import LlmkitError

AVERAGES = ("binary", "macro", "micro", "weighted")
CLASSIFICATION = {"accuracy", "mcc", "roc_auc", "pr_auc", "confusion",
                  *(f"{m}{suffix}" for m in ("precision", "recall", "f1") for suffix in ("", *(f"_{a}" for a in AVERAGES)))}
REGRESSION = {"pearson", "spearman"}
GENERATION = {"bleu", "chrf", "chrf++", "ter", "rouge", "rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "exact_match", "token_f1"}
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def kind_of(metric: str) -> str:
    if metric in CLASSIFICATION:
        return "classification"
    if metric in REGRESSION:
        return "regression"
    if metric in GENERATION:
        return "generation"
    raise LlmkitError(f"unknown metric {metric!r}",
                      f"use some of: {', '.join(sorted(CLASSIFICATION | REGRESSION | GENERATION))}")


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """What a metric reads: generated texts with their references, or labels with predictions (and scores)."""

    predictions: list = field(default_factory=list)
    references: list[list[str]] | None = None  # generation: one or more references per prediction
    labels: list | None = None  # classification and regression: the gold value per prediction
    scores: list | None = None  # classification: the positive class's probability, or one per class (sorted labels)
    classes: list | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def take(self, index: np.ndarray) -> "Examples":
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return Examples(pick(self.predictions), pick(self.references), pick(self.labels), pick(self.scores), self.classes)


def _read_lines(path: Path) -> list[str]:
    from llmkit.data.sources import read_text

    text, _ = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the newline that ends the last line
    return [line.rstrip("\r") for line in lines]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path}:{n} is not valid JSON ({e.msg})", "fix or remove that line") from None
        if not isinstance(row, dict):
            raise LlmkitError(f"{path}:{n} is not a JSON object", 'write rows like {"prediction": ..., "label": ...}')
        rows.append((n, row))
    return rows


def _texts(path: Path, field_name: str, *, many: bool) -> list:
    """The texts of a .txt file (one per line) or of a JSONL field (a string, or with `many` a list of strings)."""
    if not path.exists():
        raise LlmkitError(f"no file at {path}", "give a .txt file (one text per line) or a .jsonl file")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        texts = _read_lines(path)
        return [[t] for t in texts] if many else texts
    out = []
    for n, row in _read_jsonl(path):
        value = row.get(field_name, row.get("references", row.get("reference")) if many else None)
        if value is None:
            raise LlmkitError(f"{path}:{n} has no field {field_name!r} (it has: {', '.join(row)})", "pass --field with the text field's name")
        if many:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise LlmkitError(f"{path}:{n}: the references must be a string or a list of strings", 'write "references": ["...", "..."]')
        elif not isinstance(value, str):
            raise LlmkitError(f"{path}:{n}: {field_name!r} must be a string", "give the text as a JSON string")
        out.append(value)
    return out


def read_generation(predictions: str | Path, references: list[str | Path] | None, field_name: str = "text") -> Examples:
    """Predictions (.txt lines or a JSONL field) and references: one or more files in the same layout (several files
    give several references per line), or, without any, a `references` field in the predictions' JSONL rows."""
    predictions = Path(predictions)
    preds = _texts(predictions, field_name, many=False)
    if not preds:
        raise LlmkitError(f"{predictions} holds no prediction", "give it one text per line")
    if references:
        columns = [_texts(Path(r), field_name, many=True) for r in references]
        for r, col in zip(references, columns):
            if len(col) != len(preds):
                raise LlmkitError(f"{r} has {len(col)} references but {predictions} has {len(preds)} predictions (line "
                                  f"{min(len(col), len(preds)) + 1} has no partner)", "give one reference line per prediction line")
        refs = [[ref for col in columns for ref in col[i]] for i in range(len(preds))]
    else:
        if predictions.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
            raise LlmkitError("generation metrics need references", "pass --references FILE (or JSONL rows with a references field)")
        refs = _texts(predictions, "references", many=True)
    return Examples(preds, refs)


def read_labelled(path: str | Path) -> Examples:
    """JSONL rows with `label`, `prediction` and, for ROC-AUC / PR-AUC, `score` (the positive class's probability, or a
    list with one per class in the sorted order of the labels)."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no file at {path}", "give a .jsonl file of rows with label, prediction (and score)")
    rows = _read_jsonl(path)
    if not rows:
        raise LlmkitError(f"{path} holds no rows", 'write one JSON object per line: {"label": ..., "prediction": ...}')
    labels, preds, scores = [], [], []
    for n, row in rows:
        for key in ("label", "prediction"):
            if key not in row:
                raise LlmkitError(f"{path}:{n} has no {key!r} (it has: {', '.join(row)})", "give every row a label and a prediction")
        labels.append(row["label"])
        preds.append(row["prediction"])
        scores.append(row.get("score"))
    have = [s is not None for s in scores]
    if any(have) and not all(have):
        raise LlmkitError(f"{path}:{rows[have.index(False)][0]} has no score while other rows do", "give every row a score, or none")
    return Examples(preds, labels=labels, scores=scores if all(have) else None)


# --- the metrics ----------------------------------------------------------------------------------------------------------


def _normalize_squad(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    p, r = _normalize_squad(prediction).split(), _normalize_squad(reference).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def wordnet_ready() -> None:
    """METEOR's WordNet, read from a local copy (never downloaded): a clear error naming the fix when it is missing."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        raise LlmkitError("METEOR needs WordNet 3.0, which nltk cannot find (llmkit never downloads it)",
                          "run `make wordnet` (Debian's wordnet-base and wordnet-sense-index, copied to .venv/nltk_data), "
                          "or set NLTK_DATA to a folder holding corpora/wordnet") from None


def _sacrebleu(metric: str):
    from sacrebleu.metrics import BLEU, CHRF, TER

    return {"bleu": BLEU(), "chrf": CHRF(), "chrf++": CHRF(word_order=2), "ter": TER()}[metric]


def _sacrebleu_refs(ex: Examples) -> list[list[str]]:
    """sacrebleu's layout: one list per reference position, each as long as the predictions (padded with None where a
    prediction has fewer references)."""
    most = max(len(r) for r in ex.references)
    return [[r[k] if k < len(r) else None for r in ex.references] for k in range(most)]


def signature(metric: str, ex: Examples) -> str | None:
    if metric not in ("bleu", "chrf", "chrf++", "ter"):
        return None
    m = _sacrebleu(metric)
    m.corpus_score(ex.predictions, _sacrebleu_refs(ex))  # the signature records what the score saw (nrefs, ...)
    return str(m.get_signature())


def _classes(ex: Examples) -> list:
    return sorted(set(ex.labels) | set(ex.predictions), key=str)


def _binary(ex: Examples, pos_label) -> tuple[list, object]:
    classes = _classes(ex)
    if len(classes) > 2:
        raise LlmkitError(f"a binary metric got {len(classes)} classes", "use the _macro, _micro or _weighted form")
    if pos_label is None:
        pos_label = next((c for c in (1, "1", True, "true", "positive", "pos", "yes") if c in classes), classes[-1])
    return classes, pos_label


def _score_matrix(ex: Examples, classes: list) -> np.ndarray:
    scores = ex.scores
    if all(isinstance(s, (int, float)) for s in scores):
        out = np.asarray(scores, dtype=float)
    else:
        lengths = {len(s) if isinstance(s, list) else 1 for s in scores}
        if lengths != {len(classes)}:
            raise LlmkitError(f"scores hold {sorted(lengths)} values per row but the labels have {len(classes)} classes "
                              f"({', '.join(map(str, classes))}): some labels are missing from the scores",
                              "give one probability per class, in the sorted order of the labels")
        out = np.asarray(scores, dtype=float)
    bad = np.flatnonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1))
    if len(bad):
        raise LlmkitError(f"row {bad[0] + 1} has a score that is not a finite number ({scores[bad[0]]})", "give probabilities, not NaN")
    return out


def metric_value(metric: str, ex: Examples, *, pos_label=None):
    """One metric on `ex` (a number; the confusion metric gives {"labels", "matrix"})."""
    from sklearn import metrics as sk

    if metric in ("bleu", "chrf", "chrf++", "ter"):
        return float(_sacrebleu(metric).corpus_score(ex.predictions, _sacrebleu_refs(ex)).score)
    if metric in ROUGE_KEYS:
        return _rouge(ex)[metric]
    if metric == "meteor":
        wordnet_ready()
        from nltk.translate.meteor_score import meteor_score

        return float(np.mean([meteor_score([r.split() for r in refs], p.split()) for p, refs in zip(ex.predictions, ex.references)]))
    if metric == "exact_match":
        return float(np.mean([max(_normalize_squad(p) == _normalize_squad(r) for r in refs) for p, refs in zip(ex.predictions, ex.references)]))
    if metric == "token_f1":
        return float(np.mean([max(_token_f1(p, r) for r in refs) for p, refs in zip(ex.predictions, ex.references)]))
    if metric in ("pearson", "spearman"):
        from scipy import stats

        x, y = np.asarray(ex.predictions, dtype=float), np.asarray(ex.labels, dtype=float)
        return float((stats.pearsonr if metric == "pearson" else stats.spearmanr)(x, y)[0])
    y, p = [str(v) for v in ex.labels], [str(v) for v in ex.predictions]
    if metric == "accuracy":
        return float(sk.accuracy_score(y, p))
    if metric == "mcc":
        return float(sk.matthews_corrcoef(y, p))
    if metric == "confusion":
        classes = [str(c) for c in _classes(ex)]
        return {"labels": classes, "matrix": sk.confusion_matrix(y, p, labels=classes).tolist()}
    if metric in ("roc_auc", "pr_auc"):
        if ex.scores is None:
            raise LlmkitError(f"{metric} needs scores", "give every row a score: the positive class's probability, or one per class")
        classes = sorted(set(ex.labels), key=str)
        score = _score_matrix(ex, classes if not all(isinstance(s, (int, float)) for s in ex.scores) else [0, 1])
        if score.ndim == 2 and len(classes) == 2:  # two classes with one probability each: keep the positive one's
            score = score[:, classes.index(_binary(Examples(ex.labels, labels=ex.labels), pos_label)[1])]
        if score.ndim == 1:  # binary: the positive class's probability
            _, pos = _binary(Examples(ex.labels, labels=ex.labels), pos_label)
            truth = [int(str(v) == str(pos)) for v in ex.labels]
            return float((sk.roc_auc_score if metric == "roc_auc" else sk.average_precision_score)(truth, score))
        if metric == "roc_auc":
            return float(sk.roc_auc_score([classes.index(v) for v in ex.labels], score, multi_class="ovr", average="macro",
                                          labels=list(range(len(classes)))))
        onehot = np.eye(len(classes))[[classes.index(v) for v in ex.labels]]
        return float(sk.average_precision_score(onehot, score, average="macro"))
    name, _, average = metric.partition("_")
    fn = {"precision": sk.precision_score, "recall": sk.recall_score, "f1": sk.f1_score}[name]
    if not average:  # f1 alone: binary for two classes, macro for more
        average = "binary" if len(_classes(ex)) <= 2 else "macro"
    if average == "binary":
        _, pos = _binary(ex, pos_label)
        return float(fn(y, p, average="binary", pos_label=str(pos), zero_division=0))
    return float(fn(y, p, average=average, zero_division=0))


def _rouge(ex: Examples) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for p, refs in zip(ex.predictions, ex.references):
        scores = scorer.score_multi(refs, p)  # the best over the references
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: v / len(ex) for k, v in totals.items()}


def bootstrap(metric: str, ex: Examples, n: int, seed: int = 0, *, pos_label=None, confidence: float = 0.95) -> dict:
    """{"value", "low", "high"}: the metric and its percentile interval over `n` resamples of the examples."""
    value = metric_value(metric, ex, pos_label=pos_label)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        index = rng.integers(0, len(ex), len(ex))
        try:
            v = metric_value(metric, ex.take(index), pos_label=pos_label)
        except (ValueError, LlmkitError):  # a resample with one class only: ROC-AUC is undefined there
            continue
        if isinstance(v, float) and math.isfinite(v):
            samples.append(v)
    if not samples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"value": value, "low": float(min(low, value)), "high": float(max(high, value))}


def expand(metrics: list[str]) -> list[str]:
    """`rouge` means its four forms; duplicates go."""
    out = []
    for m in metrics:
        for name in (ROUGE_KEYS if m == "rouge" else (m,)):
            kind_of(name)
            if name not in out:
                out.append(name)
    return out


def compute(metrics: list[str], ex: Examples, *, bootstrap_samples: int = 0, seed: int = 0, pos_label=None) -> dict:
    """{metric: value, or {"value", "low", "high"} with bootstrap_samples > 0}, for every metric asked for."""
    names = expand(metrics)
    kinds = {kind_of(m) for m in names}
    if len(kinds) > 1 and "generation" in kinds:
        raise LlmkitError("generation metrics and label metrics read different inputs", "run them in two commands")
    if not len(ex):
        raise LlmkitError("there is nothing to score", "give at least one example")
    out = {}
    for m in names:
        if bootstrap_samples and m != "confusion":
            out[m] = bootstrap(m, ex, bootstrap_samples, seed, pos_label=pos_label)
        else:
            out[m] = metric_value(m, ex, pos_label=pos_label)
    return out


def plot_confusion(confusion: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit import io

    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    ax.set_title("confusion matrix")
    io.save_figure(fig, path)
    plt.close(fig)
