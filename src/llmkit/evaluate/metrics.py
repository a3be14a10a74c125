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

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmkit import io as llmkit_io
from llmkit.errors import LlmkitError

AVERAGES = ("binary", "macro", "micro", "weighted")
CLASSIFICATION = {
    "accuracy",
    "mcc",
    "roc_auc",
    "pr_auc",
    "confusion",
    *(f"{m}{suffix}" for m in ("precision", "recall", "f1") for suffix in ("", *(f"_{a}" for a in AVERAGES))),
}
REGRESSION = {"pearson", "spearman"}
GENERATION = {"bleu", "chrf", "chrf++", "ter", "rouge", "rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "exact_match", "token_f1"}
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def json_safe(value):
    """NaN and infinities (an undefined metric) as null, so that the output is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def kind_of(metric: str) -> str:
    if metric in CLASSIFICATION:
        return "classification"
    if metric in REGRESSION:
        return "regression"
    if metric in GENERATION:
        return "generation"
    raise LlmkitError(f"unknown metric {metric!r}", f"use some of: {', '.join(sorted(CLASSIFICATION | REGRESSION | GENERATION))}")


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

    def take(self, index) -> Examples:
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return Examples(pick(self.predictions), pick(self.references), pick(self.labels), pick(self.scores), self.classes)


def _read_lines(path: Path) -> list[str]:
    from llmkit.data.sources import read_text

    text, _ = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the newline that ends the last line
    return [line.rstrip("\r") for line in lines]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line."""
    rows = llmkit_io.parse_jsonl("\n".join(_read_lines(path)), path, "fix or remove that line")
    for n, row in rows:
        if not isinstance(row, dict):
            raise LlmkitError(f"{path}:{n} is not a JSON object", 'write rows like {"prediction": ..., "label": ...}')
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
            raise LlmkitError(
                f"{path}:{n} has no field {field_name!r} (it has: {', '.join(row)})", "pass --field with the text field's name"
            )
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
                raise LlmkitError(
                    f"{r} has {len(col)} references but {predictions} has {len(preds)} predictions (line "
                    f"{min(len(col), len(preds)) + 1} has no partner)",
                    "give one reference line per prediction line",
                )
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
        score = row.get("score")
        values = score if isinstance(score, list) else [score]
        if score is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise LlmkitError(f"{path}:{n} has a score that is not a finite number ({score})", "give probabilities, not NaN")
        scores.append(score)
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
        raise LlmkitError(
            "METEOR needs WordNet 3.0, which nltk cannot find (llmkit never downloads it)",
            "run `make wordnet` (Debian's wordnet-base and wordnet-sense-index, copied to .venv/nltk_data), "
            "or set NLTK_DATA to a folder holding corpora/wordnet",
        ) from None


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


def _key(value):
    """Labels compare by value: 1, 1.0 and "1"... stay apart only when they differ as JSON values would; booleans are
    the words true / false; numbers compare as numbers (so 2 sorts before 10)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def _show(key) -> str:
    return str(int(key)) if isinstance(key, float) and key.is_integer() else str(key)


def _sorted(keys) -> list:
    keys = set(keys)
    numbers = sorted(k for k in keys if isinstance(k, float))
    return numbers + sorted(k for k in keys if not isinstance(k, float))


def _classes(ex: Examples) -> list:
    """The classes as keys: the given order (`Examples.classes`), else every label and prediction sorted (numbers
    numerically, before words)."""
    if ex.classes is not None:
        return [_key(c) for c in ex.classes]
    return _sorted(_key(v) for v in list(ex.labels) + list(ex.predictions))


def _positive(classes: list, pos_label) -> object:
    """The positive class's key among two: `pos_label` (matched by value or by text), else 1, true, positive, pos or
    yes, else the last class."""
    if pos_label is not None:
        for c in classes:
            if c == _key(pos_label) or _show(c) == str(pos_label) or str(c).lower() == str(pos_label).lower():
                return c
        raise LlmkitError(
            f"the positive label {pos_label!r} is not among the classes ({', '.join(map(_show, classes))})",
            "give --pos-label as one of them",
        )
    return next((c for c in (1.0, "true", "positive", "pos", "yes", "1") if c in classes), classes[-1])


def _binary(ex: Examples, pos_label) -> tuple[list, object]:
    classes = _classes(ex)
    if len(classes) > 2:
        raise LlmkitError(f"a binary metric got {len(classes)} classes", "use the _macro, _micro or _weighted form")
    return classes, _positive(classes, pos_label)


def _score_matrix(ex: Examples, classes: list) -> np.ndarray:
    scores = ex.scores
    if all(isinstance(s, (int, float)) for s in scores):
        out = np.asarray(scores, dtype=float)
    else:
        lengths = {len(s) if isinstance(s, list) else 1 for s in scores}
        if lengths != {len(classes)}:
            raise LlmkitError(
                f"scores hold {sorted(lengths)} values per row but there are {len(classes)} classes ({', '.join(map(_show, classes))})",
                "give one probability per class, in the sorted order of the classes (numbers numerically), "
                "or name their order (--classes a,b,c)",
            )
        out = np.asarray(scores, dtype=float)
    bad = np.flatnonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1))
    if len(bad):
        raise LlmkitError(f"example {bad[0] + 1} has a score that is not a finite number ({scores[bad[0]]})", "give probabilities, not NaN")
    return out


def _finite(values, what: str) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise LlmkitError(f"the {what} of a regression metric are not all numbers", "give numbers as label and prediction") from None
    bad = np.flatnonzero(~np.isfinite(x))
    if len(bad):
        raise LlmkitError(f"example {bad[0] + 1} has a {what[:-1]} that is not a finite number ({values[bad[0]]})", "give finite numbers")
    return x


def per_example(metric: str, ex: Examples) -> np.ndarray | None:
    """Each example's own score, for the metrics that are a mean over examples (ROUGE, METEOR, exact match, token F1,
    accuracy); None for the metrics computed over the whole corpus (BLEU, chrF, TER, F1, AUC, correlations...)."""
    if metric in ROUGE_KEYS:
        return np.asarray(_rouge_rows(ex)[metric])
    if metric == "meteor":
        wordnet_ready()
        from nltk.translate.meteor_score import meteor_score

        return np.array([meteor_score([r.split() for r in refs], p.split()) for p, refs in zip(ex.predictions, ex.references)])
    if metric == "exact_match":
        return np.array(
            [float(max(_normalize_squad(p) == _normalize_squad(r) for r in refs)) for p, refs in zip(ex.predictions, ex.references)]
        )
    if metric == "token_f1":
        return np.array([max(_token_f1(p, r) for r in refs) for p, refs in zip(ex.predictions, ex.references)])
    if metric == "accuracy":
        return np.array([float(_key(y) == _key(p)) for y, p in zip(ex.labels, ex.predictions)])
    return None


def resolve(metric: str, ex: Examples) -> str:
    """`f1`, `precision` and `recall` alone mean the binary form for two classes and the macro one for more, decided
    on these examples (a bootstrap resample keeps the decision)."""
    if metric in ("f1", "precision", "recall"):
        return f"{metric}_{'binary' if len(_classes(ex)) <= 2 else 'macro'}"
    return metric


def metric_value(metric: str, ex: Examples, *, pos_label=None):
    """One metric on `ex` (a number; the confusion metric gives {"labels", "matrix"})."""
    from sklearn import metrics as sk

    if metric in ("bleu", "chrf", "chrf++", "ter"):
        return float(_sacrebleu(metric).corpus_score(ex.predictions, _sacrebleu_refs(ex)).score)
    rows = per_example(metric, ex)
    if rows is not None:
        return float(rows.mean())
    if metric in ("pearson", "spearman"):
        from scipy import stats

        x, y = _finite(ex.predictions, "predictions"), _finite(ex.labels, "labels")
        return float((stats.pearsonr if metric == "pearson" else stats.spearmanr)(x, y)[0])
    if metric in ("roc_auc", "pr_auc"):  # the scores' columns are the labels' classes (predictions play no part)
        if ex.scores is None:
            raise LlmkitError(f"{metric} needs scores", "give every row a score: the positive class's probability, or one per class")
        classes = _classes(ex) if ex.classes is not None else _sorted(_key(v) for v in ex.labels)
        index = {c: i for i, c in enumerate(classes)}
        if any(_key(v) not in index for v in ex.labels):
            raise LlmkitError("a label is not one of the classes given", "list every class")
        y_index = [index[_key(v)] for v in ex.labels]
        one_column = all(isinstance(s, (int, float)) for s in ex.scores)
        score = _score_matrix(ex, classes if not one_column else [0, 1])
        if len(classes) <= 2:
            pos = _positive(classes, pos_label)
            if score.ndim == 2:  # one probability per class: keep the positive one's
                score = score[:, classes.index(pos)]
            truth = [int(classes[i] == pos) for i in y_index]
            return float((sk.roc_auc_score if metric == "roc_auc" else sk.average_precision_score)(truth, score))
        if score.ndim == 1:
            raise LlmkitError(f"{metric} over {len(classes)} classes needs one probability per class in each score", "give lists of scores")
        if metric == "roc_auc":
            return float(sk.roc_auc_score(y_index, score, multi_class="ovr", average="macro", labels=list(range(len(classes)))))
        return float(sk.average_precision_score(np.eye(len(classes))[y_index], score, average="macro"))
    classes = _classes(ex)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [v for v in list(ex.labels) + list(ex.predictions) if _key(v) not in index]
    if unknown:
        raise LlmkitError(f"{unknown[0]!r} is not one of the classes given ({', '.join(map(_show, classes))})", "list every class")
    gold = [index[_key(v)] for v in ex.labels]
    guess = [index[_key(v)] for v in ex.predictions]
    everyone = list(range(len(classes)))
    if metric == "mcc":
        return float(sk.matthews_corrcoef(gold, guess))
    if metric == "confusion":
        return {"labels": [_show(c) for c in classes], "matrix": sk.confusion_matrix(gold, guess, labels=everyone).tolist()}
    name, _, average = resolve(metric, ex).partition("_")
    fn = {"precision": sk.precision_score, "recall": sk.recall_score, "f1": sk.f1_score}[name]
    if average == "binary":
        pos = _positive(_binary(ex, pos_label)[0], pos_label)
        return float(fn(gold, guess, average="binary", pos_label=index[pos], zero_division=0))
    return float(fn(gold, guess, average=average, labels=everyone if average != "micro" else None, zero_division=0))


def _rouge_rows(ex: Examples) -> dict[str, list[float]]:
    """Each example's ROUGE F-measures (the best over its references), as rouge-score computes them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    rows = {k: [] for k in ROUGE_KEYS}
    for p, refs in zip(ex.predictions, ex.references):
        scores = scorer.score_multi(refs, p)
        for k in ROUGE_KEYS:
            rows[k].append(scores[k].fmeasure)
    return rows


def bootstrap(metric: str, ex: Examples, n: int, seed: int = 0, *, pos_label=None, confidence: float = 0.95) -> dict:
    """{"value", "low", "high"}: the metric and its percentile interval over `n` resamples of the examples. Means over
    examples resample the examples' scores; corpus metrics are recomputed on each resample, with the classes, the
    positive class and the averaging fixed on the whole set."""
    rng = np.random.default_rng(seed)
    rows = per_example(metric, ex)
    value = float(rows.mean()) if rows is not None else metric_value(metric, ex, pos_label=pos_label)
    if rows is not None and len(rows) and (rows == rows[0]).all() and rows[0] in (0.0, 1.0):
        # 0 of n (or n of n) right: every resample is the same, and a percentile interval [0, 0] would claim certainty;
        # a proportion at the edge gets Wilson's score interval instead (as the arena's A/B test reports)
        from statistics import NormalDist

        from llmkit.evaluate.arena import wilson

        low, high = wilson(float(rows.sum()), len(rows), NormalDist().inv_cdf(0.5 + confidence / 2))
        return {"value": value, "low": float(low), "high": float(high)}
    if rows is not None:
        samples = rows[rng.integers(0, len(ex), (n, len(ex)))].mean(1).tolist()
    else:
        fixed = Examples(ex.predictions, ex.references, ex.labels, ex.scores, ex.classes)
        if ex.labels is not None and metric not in ("pearson", "spearman"):
            if fixed.classes is None:
                fixed.classes = _sorted(_key(v) for v in ex.labels) if metric in ("roc_auc", "pr_auc") else _classes(ex)
            if len(fixed.classes) <= 2:
                pos_label = _positive(_classes(fixed), pos_label)
        name = resolve(metric, ex) if ex.labels is not None else metric
        samples = []
        for _ in range(n):
            try:
                v = metric_value(name, fixed.take(rng.integers(0, len(ex), len(ex))), pos_label=pos_label)
            except (ValueError, LlmkitError):  # a resample with one class only: ROC-AUC is undefined there
                continue
            if isinstance(v, float) and math.isfinite(v):
                samples.append(v)
    if not samples:
        return {"value": value, "low": float("nan"), "high": float("nan")}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high)}


def expand(metrics: list[str]) -> list[str]:
    """`rouge` means its four forms; duplicates go."""
    out = []
    for m in metrics:
        for name in ROUGE_KEYS if m == "rouge" else (m,):
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
