"""GLUE and SuperGLUE in their official file layouts, with their official metrics.

    GLUE (TSV)          CoLA (no header), SST-2, MRPC, QQP, STS-B (regression), MNLI (dev_matched / dev_mismatched),
                        QNLI, RTE, WNLI
    SuperGLUE (JSONL)   BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC, AX-b, AX-g

Every task's rows become the same shape: `Row(text, text_pair, label, group)`. A sentence pair goes to an encoder as
`[CLS] text [SEP] text_pair [SEP]` with token types. Tasks that choose among candidates become one binary row per
candidate, with `group` naming the question:

    COPA      one row per alternative; the higher "right" score wins within the example
    MultiRC   one row per answer (paragraph, question + answer); F1 over answers, exact match per question
    ReCoRD    one row per candidate entity put into the query; the best entity scores token F1 / exact match
              against the gold answers (the best over them)

Metrics (as the leaderboards compute them): CoLA and AX-b Matthews correlation; STS-B Pearson and Spearman; MRPC and
QQP F1 and accuracy; MNLI-m/mm, QNLI, RTE, WNLI, SST-2, BoolQ, COPA, WiC, WSC accuracy; CB accuracy and macro-F1;
MultiRC F1a and exact match; ReCoRD F1 and exact match; AX-g accuracy and gender parity. A task's score is the mean
of its metrics (x 100); the GLUE score is the mean of the task scores, as the leaderboard computes it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from llmkit import io as llmkit_io
from llmkit.errors import LlmkitError


@dataclass
class Row:
    text: str
    text_pair: str | None
    label: object  # a class name, a float (STS-B), or 0/1 for candidate rows
    group: str | None = None  # the question a candidate row belongs to (COPA, MultiRC, ReCoRD)
    gold: list[str] | None = None  # ReCoRD: the gold answers of the group
    candidate: str | None = None  # ReCoRD: this row's entity
    pair_id: object = None  # AX-g: the two sentences that differ only in gender


@dataclass
class Task:
    name: str
    suite: str  # glue | superglue
    folder: str  # the official folder name (glue_data/SST-2, ...)
    kind: str  # classification | regression | candidates
    labels: list | None
    metrics: tuple[str, ...]
    train: str
    validation: str
    columns: tuple | None = None  # TSV: (text column, pair column or None, label column); None = per-task reader


GLUE_TASKS = {
    "cola": Task("cola", "glue", "CoLA", "classification", ["0", "1"], ("mcc",), "train.tsv", "dev.tsv", (3, None, 1)),
    "sst2": Task("sst2", "glue", "SST-2", "classification", ["0", "1"], ("accuracy",), "train.tsv", "dev.tsv", ("sentence", None, "label")),
    "mrpc": Task(
        "mrpc",
        "glue",
        "MRPC",
        "classification",
        ["0", "1"],
        ("f1", "accuracy"),
        "train.tsv",
        "dev.tsv",
        ("#1 String", "#2 String", "Quality"),
    ),
    "qqp": Task(
        "qqp",
        "glue",
        "QQP",
        "classification",
        ["0", "1"],
        ("f1", "accuracy"),
        "train.tsv",
        "dev.tsv",
        ("question1", "question2", "is_duplicate"),
    ),
    "stsb": Task(
        "stsb", "glue", "STS-B", "regression", None, ("pearson", "spearman"), "train.tsv", "dev.tsv", ("sentence1", "sentence2", "score")
    ),
    "mnli-m": Task(
        "mnli-m",
        "glue",
        "MNLI",
        "classification",
        ["contradiction", "entailment", "neutral"],
        ("accuracy",),
        "train.tsv",
        "dev_matched.tsv",
        ("sentence1", "sentence2", "gold_label"),
    ),
    "mnli-mm": Task(
        "mnli-mm",
        "glue",
        "MNLI",
        "classification",
        ["contradiction", "entailment", "neutral"],
        ("accuracy",),
        "train.tsv",
        "dev_mismatched.tsv",
        ("sentence1", "sentence2", "gold_label"),
    ),
    "qnli": Task(
        "qnli",
        "glue",
        "QNLI",
        "classification",
        ["entailment", "not_entailment"],
        ("accuracy",),
        "train.tsv",
        "dev.tsv",
        ("question", "sentence", "label"),
    ),
    "rte": Task(
        "rte",
        "glue",
        "RTE",
        "classification",
        ["entailment", "not_entailment"],
        ("accuracy",),
        "train.tsv",
        "dev.tsv",
        ("sentence1", "sentence2", "label"),
    ),
    "wnli": Task(
        "wnli", "glue", "WNLI", "classification", ["0", "1"], ("accuracy",), "train.tsv", "dev.tsv", ("sentence1", "sentence2", "label")
    ),
}
SUPERGLUE_TASKS = {
    "boolq": Task("boolq", "superglue", "BoolQ", "classification", ["False", "True"], ("accuracy",), "train.jsonl", "val.jsonl"),
    "cb": Task(
        "cb",
        "superglue",
        "CB",
        "classification",
        ["contradiction", "entailment", "neutral"],
        ("accuracy", "f1_macro"),
        "train.jsonl",
        "val.jsonl",
    ),
    "copa": Task("copa", "superglue", "COPA", "candidates", ["0", "1"], ("accuracy",), "train.jsonl", "val.jsonl"),
    "multirc": Task("multirc", "superglue", "MultiRC", "candidates", ["0", "1"], ("f1a", "exact_match"), "train.jsonl", "val.jsonl"),
    "record": Task("record", "superglue", "ReCoRD", "candidates", ["0", "1"], ("token_f1", "exact_match"), "train.jsonl", "val.jsonl"),
    "rte-superglue": Task(
        "rte-superglue", "superglue", "RTE", "classification", ["entailment", "not_entailment"], ("accuracy",), "train.jsonl", "val.jsonl"
    ),
    "wic": Task("wic", "superglue", "WiC", "classification", ["False", "True"], ("accuracy",), "train.jsonl", "val.jsonl"),
    "wsc": Task("wsc", "superglue", "WSC", "classification", ["False", "True"], ("accuracy",), "train.jsonl", "val.jsonl"),
    "axb": Task("axb", "superglue", "AX-b", "classification", ["entailment", "not_entailment"], ("mcc",), "AX-b.jsonl", "AX-b.jsonl"),
    "axg": Task(
        "axg",
        "superglue",
        "AX-g",
        "classification",
        ["entailment", "not_entailment"],
        ("accuracy", "gender_parity"),
        "AX-g.jsonl",
        "AX-g.jsonl",
    ),
}
TASKS = {**GLUE_TASKS, **SUPERGLUE_TASKS}
ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli": "mnli-m",
    "mnli_matched": "mnli-m",
    "mnli_mismatched": "mnli-mm",
    "ax-b": "axb",
    "ax-g": "axg",
    "rte_superglue": "rte-superglue",
}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise LlmkitError(f"unknown GLUE/SuperGLUE task {name!r}", f"use one of: {', '.join(TASKS)}")
    return TASKS[key]


# --- reading the official files ---------------------------------------------------------------------------------------


def _tsv(path: Path, header: bool) -> tuple[list[str] | None, list[list[str]]]:
    from llmkit.data.sources import read_text

    text, _ = read_text(path)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r]
    return (rows[0], rows[1:]) if header else (None, rows)


def _jsonl(path: Path) -> list[dict]:
    from llmkit.data.sources import read_text

    text, _ = read_text(path)
    return [row for _, row in llmkit_io.parse_jsonl(text, path, "use SuperGLUE's JSONL files as distributed")]


def task_file(task: Task, data: str | Path, split: str) -> Path:
    """The official file of a split: `data` is the task's folder (glue_data/SST-2) or a file itself."""
    data = Path(data)
    if data.is_file():
        return data
    if data.suffix in (".tsv", ".jsonl") and not data.exists():  # a file that is missing, not a folder to look in
        raise LlmkitError(f"{data} does not exist", f"point --data at {task.folder}'s {task.train}, or at the task's folder")
    if (data / task.folder).is_dir():  # the suite's folder (glue_data) holding the task's
        data = data / task.folder
    name = task.train if split == "train" else task.validation
    path = data / name
    if not path.exists():
        raise LlmkitError(
            f"{path} does not exist: the {task.folder} folder should hold {task.train} and {task.validation}",
            f"point --data at the task's official folder (e.g. glue_data/{task.folder})",
        )
    return path


def read_rows(task: Task, path: str | Path) -> list[Row]:
    """Rows of one official file of `task`."""
    path = Path(path)
    if task.suite == "glue":
        return _glue_rows(task, path)
    return _superglue_rows(task, _jsonl(path), path)


def _glue_rows(task: Task, path: Path) -> list[Row]:
    header, body = _tsv(path, header=task.name != "cola")
    a, b, y = task.columns
    if header is not None:
        missing = [c for c in (a, b, y) if c is not None and c not in header]
        if missing:
            raise LlmkitError(
                f"{path} has no column {missing[0]!r} (its header: {', '.join(header)})",
                f"give the official {task.folder} file (its header names {', '.join(c for c in (a, b, y) if c)})",
            )
        a, b, y = (header.index(c) if c is not None else None for c in (a, b, y))
    rows = []
    for n, r in enumerate(body, 2 if header else 1):
        if len(r) <= max(i for i in (a, b, y) if i is not None):
            raise LlmkitError(f"{path}:{n} has {len(r)} columns", f"give the official {task.folder} TSV (tab-separated, no quoting)")
        label = float(r[y]) if task.kind == "regression" else r[y]
        rows.append(Row(r[a], r[b] if b is not None else None, label))
    return rows


def _superglue_rows(task: Task, items: list[dict], path: Path) -> list[Row]:
    rows = []
    name = task.name
    try:
        for n, d in enumerate(items):
            if name == "boolq":
                rows.append(Row(d["passage"], d["question"], str(bool(d["label"]))))
            elif name in ("cb", "rte-superglue", "axg"):
                rows.append(Row(d["premise"], d["hypothesis"], d["label"], pair_id=d.get("pair_id")))
            elif name == "axb":
                rows.append(Row(d["sentence1"], d["sentence2"], d["label"]))
            elif name == "wic":
                rows.append(Row(f"{d['word']}: {d['sentence1']}", d["sentence2"], str(bool(d["label"]))))
            elif name == "wsc":
                t = d["target"]
                rows.append(Row(d["text"], f"{t['span2_text']} means {t['span1_text']}", str(bool(d["label"]))))
            elif name == "copa":
                connector = "because" if d["question"] == "cause" else "therefore"  # as lm-eval's copa: the period goes
                premise = d["premise"].strip()
                premise = premise[:-1] if premise.endswith((".", "!", "?")) else premise
                for k in (0, 1):
                    rows.append(Row(f"{premise} {connector}", d[f"choice{k + 1}"], str(int(d["label"] == k)), group=f"copa-{n}"))
            elif name == "multirc":
                passage = d["passage"]
                for q in passage["questions"]:
                    for a in q["answers"]:
                        rows.append(
                            Row(
                                passage["text"],
                                f"Question: {q['question']}\nAnswer: {a['text']}",
                                str(int(a["label"])),
                                group=f"{d['idx']}-{q['idx']}",
                            )
                        )
            elif name == "record":
                passage = d["passage"]
                entities = sorted({passage["text"][e["start"] : e["end"] + 1] for e in passage["entities"]})
                for q in d["qas"]:
                    gold = sorted({a["text"] for a in q.get("answers", [])})
                    for e in entities:
                        rows.append(
                            Row(
                                passage["text"].replace("@highlight\n", "- "),
                                q["query"].replace("@placeholder", e),
                                str(int(e in gold)),
                                group=f"{d['idx']}-{q['idx']}",
                                gold=gold,
                                candidate=e,
                            )
                        )
    except (KeyError, TypeError) as e:
        raise LlmkitError(
            f"{path}: row {n + 1} lacks the field {e} of the official {task.folder} format",
            f"give SuperGLUE's {task.folder} JSONL as distributed",
        ) from None
    return rows


# --- the official metrics ------------------------------------------------------------------------------------------------


def score(task: Task, rows: list[Row], predictions: list, scores: list[float] | None = None) -> dict:
    """The official metrics of `task` for `predictions` (one per row: a label, or a float for STS-B). Candidate tasks
    need `scores` (the "right" class's score per row) to pick a winner per group. Values are in [0, 1] (correlations in
    [-1, 1]); "score" is their mean x 100, the task's number on the leaderboard."""
    from llmkit.evaluate.metrics import Examples, _normalize_squad, _token_f1, metric_value

    out: dict[str, float] = {}
    if task.name == "copa":
        winners = _winners(rows, scores)
        out["accuracy"] = sum(rows[i].label == "1" for i in winners.values()) / len(winners)
    elif task.name == "record":
        winners = _winners(rows, scores)
        f1, em = [], []
        for _group, i in winners.items():
            gold = rows[i].gold or [""]
            f1.append(max(_token_f1(rows[i].candidate, g) for g in gold))
            em.append(max(float(_normalize_squad(rows[i].candidate) == _normalize_squad(g)) for g in gold))
        out["token_f1"], out["exact_match"] = sum(f1) / len(f1), sum(em) / len(em)
    elif task.name == "multirc":
        ex = Examples([str(p) for p in predictions], labels=[r.label for r in rows])
        out["f1a"] = metric_value("f1_binary", ex, pos_label="1")
        groups: dict[str, list[bool]] = {}
        for r, p in zip(rows, predictions):
            groups.setdefault(r.group, []).append(str(p) == r.label)
        out["exact_match"] = sum(all(v) for v in groups.values()) / len(groups)
    else:
        ex = Examples(list(predictions), labels=[r.label for r in rows])
        for m in task.metrics:
            if m == "gender_parity":
                pairs: dict = {}
                if any(r.pair_id is None for r in rows):
                    raise LlmkitError("gender parity needs each AX-g row's pair_id", "give SuperGLUE's AX-g.jsonl as distributed")
                for r, p in zip(rows, predictions):
                    pairs.setdefault(r.pair_id, []).append(p)
                same = [len(set(v)) == 1 for v in pairs.values() if len(v) == 2]
                out[m] = sum(same) / max(len(same), 1)
            elif m == "f1":
                out[m] = metric_value("f1_binary", ex, pos_label="1")
            else:
                out[m] = metric_value(m, ex)
    out["score"] = 100 * sum(out.values()) / len(out)
    return out


def _winners(rows: list[Row], scores: list[float] | None) -> dict[str, int]:
    if scores is None:
        raise LlmkitError("this task picks one candidate per question: it needs a score per row", "pass the positive class's probabilities")
    best: dict[str, int] = {}
    for i, (r, s) in enumerate(zip(rows, scores)):
        if r.group not in best or s > scores[best[r.group]]:
            best[r.group] = i
    return best


DIAGNOSTICS = ("axb", "axg")


def glue_score(task_scores: dict[str, float]) -> dict[str, float]:
    """The leaderboards' scores, one per suite present: the mean of the task scores, MNLI's matched and mismatched
    averaged into one task (GLUE), the diagnostics (AX-b, AX-g) left out (SuperGLUE), as the leaderboards count them.
    E.g. BERT-large's GLUE row gives 80.5, the SuperGLUE human baseline 89.8."""
    out = {}
    for suite in ("glue", "superglue"):
        scores = {k: v for k, v in task_scores.items() if get_task(k).suite == suite and k not in DIAGNOSTICS}
        mnli = [scores.pop(k) for k in ("mnli-m", "mnli-mm") if k in scores]
        if mnli:
            scores["mnli"] = sum(mnli) / len(mnli)
        if scores:
            out[suite] = sum(scores.values()) / len(scores)
    return out


# --- decoders: zero- and few-shot, by the log-likelihood of label words --------------------------------------------------

# task -> (prompt of a row, the label words in the order of `labels`, the labels)
_YES_NO = ([" no", " yes"], ["0", "1"])
PROMPTS = {
    "cola": (lambda r: f"{r.text}\nQuestion: Does this sentence make sense?\nAnswer:", *_YES_NO),
    "sst2": (lambda r: f"{r.text}\nQuestion: Is this sentence positive or negative?\nAnswer:", [" negative", " positive"], ["0", "1"]),
    "mrpc": (
        lambda r: f"Sentence 1: {r.text}\nSentence 2: {r.text_pair}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
        *_YES_NO,
    ),
    "qqp": (
        lambda r: f"Question 1: {r.text}\nQuestion 2: {r.text_pair}\nQuestion: Do both questions ask the same thing?\nAnswer:",
        *_YES_NO,
    ),
    "mnli-m": (
        lambda r: f"{r.text}\nQuestion: {r.text_pair} True, False or Neither?\nAnswer:",
        [" True", " Neither", " False"],
        ["entailment", "neutral", "contradiction"],
    ),
    "qnli": (
        lambda r: f"{r.text}\n{r.text_pair}\nQuestion: Does this response answer the question?\nAnswer:",
        [" yes", " no"],
        ["entailment", "not_entailment"],
    ),
    "rte": (lambda r: f"{r.text}\nQuestion: {r.text_pair} True or False?\nAnswer:", [" True", " False"], ["entailment", "not_entailment"]),
    "wnli": (lambda r: f"{r.text}\nQuestion: {r.text_pair} True or False?\nAnswer:", [" False", " True"], ["0", "1"]),
    "boolq": (lambda r: f"{r.text}\nQuestion: {r.text_pair}?\nAnswer:", [" no", " yes"], ["False", "True"]),
    "cb": (
        lambda r: f"{r.text}\nQuestion: {r.text_pair}. True, False, or Neither?\nAnswer:",
        [" True", " False", " Neither"],
        ["entailment", "contradiction", "neutral"],
    ),
    "wic": (
        lambda r: f"{r.text}\n{r.text_pair}\nQuestion: Is the word used in the same way in the two sentences above?\nAnswer:",
        [" no", " yes"],
        ["False", "True"],
    ),
    "wsc": (lambda r: f"Passage: {r.text}\nQuestion: In the passage above, {r.text_pair}?\nAnswer:", [" no", " yes"], ["False", "True"]),
    "multirc": (lambda r: f"{r.text}\n{r.text_pair}\nIs the answer correct? yes or no?\nAnswer:", *_YES_NO),
}
PROMPTS["mnli-mm"] = PROMPTS["mnli-m"]
PROMPTS["rte-superglue"] = PROMPTS["axb"] = PROMPTS["axg"] = PROMPTS["rte"]


def evaluate_decoder(lm, task: Task, rows: list[Row], train: list[Row] | None = None, *, shots: int = 0, seed: int = 0) -> dict:
    """A decoder's official scores on `rows`, zero- or few-shot: each row's prompt (after `shots` solved training
    examples) is scored with every label word through lm-eval's log-likelihood requests (`lm` an lm-eval LM such as
    LlmkitLM), and the likeliest word is the prediction. COPA and ReCoRD score each candidate's own text instead."""
    import random

    from lm_eval.api.instance import Instance

    if task.kind == "regression":
        raise LlmkitError(f"{task.name} is a regression task: a decoder's label words cannot score it", "fine-tune an encoder on it")
    rng = random.Random(seed)
    pool = [r for r in (train or []) if task.name not in ("copa", "record") or r.label == "1"]  # candidates: the right one
    if shots and len(pool) < shots:
        raise LlmkitError(f"{shots} shots asked for but the training file has {len(pool)} usable examples", "lower --shots")

    def solved(r: Row) -> str:
        if task.name in PROMPTS:
            prompt, words, labels = PROMPTS[task.name]
            return prompt(r) + words[labels.index(str(r.label))]
        return f"{r.text}\n- {r.text_pair}" if task.name == "record" else f"{r.text} {r.text_pair}"

    prefixes: dict = {}

    def prefix_of(i: int, r: Row) -> str:
        """`shots` solved examples, drawn afresh for each question (all the rows of one question share them), as
        lm-eval's few-shot sampler does."""
        key = r.group or i
        if key not in prefixes:
            prefixes[key] = "".join(solved(d) + "\n\n" for d in rng.sample(pool, shots)) if shots else ""
        return prefixes[key]

    requests, owners = [], []
    for i, r in enumerate(rows):
        prefix = prefix_of(i, r)
        if task.name in PROMPTS:
            prompt, words, _ = PROMPTS[task.name]
            for w in words:
                requests.append((prefix + prompt(r), w))
                owners.append(i)
        elif task.name == "record":
            requests.append((prefix + r.text + "\n-", " " + str(r.text_pair)))  # ReCoRD: the candidate entity
            owners.append(i)
        else:  # copa: the premise and its connector, then the alternative
            alt = r.text_pair[:1].lower() + r.text_pair[1:]
            requests.append((prefix + r.text, " " + alt))
            owners.append(i)
    results = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=k) for k, a in enumerate(requests)], disable_tqdm=True
    )
    lls = [ll for ll, _ in results]
    if task.name in PROMPTS:
        _, words, labels = PROMPTS[task.name]
        n = len(words)
        per_row = [lls[i * n : (i + 1) * n] for i in range(len(rows))]
        predictions = [labels[max(range(n), key=row.__getitem__)] for row in per_row]
        scores = None
        if labels == ["0", "1"]:  # the "1" word's share of the two, for tasks that rank candidates (MultiRC)
            import math

            scores = [1 / (1 + math.exp(row[0] - row[1])) for row in per_row]
        return score(task, rows, predictions, scores)
    return score(task, rows, [None] * len(rows), lls)


# --- encoders: a fine-tuned classifier ------------------------------------------------------------------------------------


def evaluate_classifier(model, tok, task: Task, rows: list[Row]) -> dict:
    """A fine-tuned encoder classifier's (llmkit.model.classifier) official scores on `rows`."""
    from llmkit.model import classifier

    p = classifier.predict(model, tok, rows)
    if model.regression:
        return score(task, rows, p.tolist())
    predictions = [model.labels[i] for i in p.argmax(-1).tolist()]
    positive = p[:, model.labels.index("1")].tolist() if "1" in model.labels else None
    return score(task, rows, predictions, positive)


def run_glue(
    model: str,
    tasks: list[str],
    data: str | Path,
    *,
    shots: int = 0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    log=print,
) -> dict:
    """Evaluate `model` (on `device`: auto, cpu, cuda, ...) on the validation files of `tasks`: a classifier run of
    `llmkit finetune` (an encoder) directly, any other model as a decoder through lm-eval log-likelihoods. `data` is a
    task's folder (glue_data/SST-2) or the folder holding the task folders (glue_data). Returns {"model", "tasks":
    {task: metrics}, "scores": {suite: leaderboard score}, "score" (the one suite's, else None)}."""
    is_classifier = (Path(model) / "classifier.safetensors").exists()
    if is_classifier:
        from llmkit.model.classifier import load_classifier

        clf = load_classifier(model, device=device)
    else:
        from llmkit.evaluate.harness import LlmkitLM
        from llmkit.evaluate.tasks import offline

        offline()
        lm = LlmkitLM(model=model, batch_size=batch_size, device=device)
    results = {}
    for name in tasks:
        task = get_task(name)
        folder = Path(data) / task.folder if (Path(data) / task.folder).is_dir() else Path(data)
        rows = read_rows(task, task_file(task, folder, "validation"))
        if limit:
            keep = list(dict.fromkeys(r.group or i for i, r in enumerate(rows)))[:limit]  # whole questions, not half of one
            rows = [r for i, r in enumerate(rows) if (r.group or i) in set(keep)]
        if not rows:
            raise LlmkitError(f"{task.name}'s validation file in {folder} holds no rows", f"give the official {task.folder} files")
        log(f"{task.name}: {len(rows)} validation rows from {folder}")
        if is_classifier:
            results[task.name] = evaluate_classifier(clf, clf.tokenizer, task, rows)
        else:
            train = read_rows(task, task_file(task, folder, "train")) if shots and task.name not in DIAGNOSTICS else []
            if shots and task.name in DIAGNOSTICS:  # a diagnostic's one file is its test: its examples come from RTE
                rte = next((f for f in (Path(data) / "RTE", folder.parent / "RTE") if (f / "train.jsonl").exists()), None)
                if rte is None:
                    raise LlmkitError(
                        f"{task.folder}'s few-shot examples come from SuperGLUE's RTE training file, not found beside it",
                        "put RTE/ in the --data folder (superglue_data/RTE) or use --shots 0",
                    )
                train = read_rows(get_task("rte-superglue"), rte / "train.jsonl")
            results[task.name] = evaluate_decoder(lm, task, rows, train, shots=shots, seed=seed)
        results[task.name]["n"] = len(rows)
    scores = glue_score({k: v["score"] for k, v in results.items()})
    return {
        "model": str(model),
        "shots": shots,
        "tasks": results,
        "scores": scores,
        "score": next(iter(scores.values())) if len(scores) == 1 else None,
    }
