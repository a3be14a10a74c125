"""Evaluation: every metric equals a direct call of its reference library, bootstrap intervals are honest and seeded,
and `llmkit eval metrics` reads the files users have and names the line that is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmkit.errors import LlmkitError
from llmkit.evaluate import metrics as M

from conftest import run_cli

# sacrebleu's README example: three hypotheses, two reference streams
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def _gen() -> M.Examples:
    return M.Examples(SYS, [[a, b] for a, b in zip(*REFS)])


def test_bleu_chrf_ter_equal_sacrebleu():
    import sacrebleu

    ex = _gen()
    assert M.metric_value("bleu", ex) == pytest.approx(sacrebleu.corpus_bleu(SYS, REFS).score)
    assert M.metric_value("bleu", ex) == pytest.approx(48.53, abs=0.01)  # the number sacrebleu's README shows
    assert M.metric_value("chrf", ex) == pytest.approx(sacrebleu.corpus_chrf(SYS, REFS).score)
    assert M.metric_value("chrf++", ex) == pytest.approx(sacrebleu.corpus_chrf(SYS, REFS, word_order=2).score)
    assert M.metric_value("ter", ex) == pytest.approx(sacrebleu.corpus_ter(SYS, REFS).score)
    assert "nrefs:2" in M.signature("bleu", ex) and "tok:13a" in M.signature("bleu", ex)


def test_rouge_equals_rouge_score_and_meteor_equals_nltk():
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    ex = _gen()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        direct = np.mean([scorer.score_multi(refs, p)[key].fmeasure for p, refs in zip(ex.predictions, ex.references)])
        assert M.metric_value(key, ex) == pytest.approx(direct)
    # rouge-score's own documented example
    one = M.Examples(["The quick brown dog jumps on the log."], [["The quick brown fox jumps over the lazy dog"]])
    assert M.metric_value("rouge1", one) == pytest.approx(0.7058823529411765)
    expected = np.mean([meteor_score([r.split() for r in refs], p.split()) for p, refs in zip(ex.predictions, ex.references)])
    assert M.metric_value("meteor", ex) == pytest.approx(expected) and 0 < expected < 1


def test_exact_match_and_token_f1_follow_squad():
    ex = M.Examples(["The Eiffel Tower!", "in Paris, France", "1889"], [["Eiffel tower"], ["Paris"], ["1887", "1889"]])
    assert M.metric_value("exact_match", ex) == pytest.approx(2 / 3)
    # token F1: 1.0, "in paris france" vs "paris" -> p=1/3, r=1 -> 0.5, 1.0
    assert M.metric_value("token_f1", ex) == pytest.approx((1 + 0.5 + 1) / 3)


def test_classification_and_regression_equal_sklearn_and_scipy():
    from scipy import stats
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    scores = rng.dirichlet(np.ones(3), 200) * 0.5 + np.eye(3)[y] * 0.5
    ex = M.Examples(p.tolist(), labels=y.tolist(), scores=scores.tolist())
    ys, ps = y.astype(str), p.astype(str)
    assert M.metric_value("accuracy", ex) == pytest.approx(sk.accuracy_score(y, p))
    assert M.metric_value("mcc", ex) == pytest.approx(sk.matthews_corrcoef(y, p))
    for avg in ("macro", "micro", "weighted"):
        assert M.metric_value(f"f1_{avg}", ex) == pytest.approx(sk.f1_score(ys, ps, average=avg))
        assert M.metric_value(f"precision_{avg}", ex) == pytest.approx(sk.precision_score(ys, ps, average=avg))
        assert M.metric_value(f"recall_{avg}", ex) == pytest.approx(sk.recall_score(ys, ps, average=avg))
    assert M.metric_value("f1", ex) == pytest.approx(sk.f1_score(ys, ps, average="macro"))  # three classes: macro
    assert M.metric_value("roc_auc", ex) == pytest.approx(sk.roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert M.metric_value("pr_auc", ex) == pytest.approx(sk.average_precision_score(np.eye(3)[y], scores, average="macro"))
    assert M.metric_value("confusion", ex)["matrix"] == sk.confusion_matrix(y, p).tolist()
    # binary, scores as the positive class's probability
    yb = rng.integers(0, 2, 100)
    sb = np.clip(yb * 0.3 + rng.random(100) * 0.7, 0, 1)
    pb = (sb > 0.5).astype(int)
    exb = M.Examples(pb.tolist(), labels=yb.tolist(), scores=sb.tolist())
    assert M.metric_value("f1", exb) == pytest.approx(sk.f1_score(yb, pb))
    assert M.metric_value("roc_auc", exb) == pytest.approx(sk.roc_auc_score(yb, sb))
    assert M.metric_value("pr_auc", exb) == pytest.approx(sk.average_precision_score(yb, sb))
    x, t = rng.random(50), rng.random(50)
    reg = M.Examples(x.tolist(), labels=(x + t).tolist())
    assert M.metric_value("pearson", reg) == pytest.approx(stats.pearsonr(x, x + t)[0])
    assert M.metric_value("spearman", reg) == pytest.approx(stats.spearmanr(x, x + t)[0])


def test_bootstrap_intervals_cover_the_value_and_reproduce_with_a_seed():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 48)
    p = np.where(rng.random(48) < 0.7, y, 1 - y)
    ex = M.Examples(p.tolist(), labels=y.tolist(), scores=(p * 0.6 + rng.random(48) * 0.4).tolist())
    for metric in ("accuracy", "f1", "roc_auc", "mcc"):
        a = M.bootstrap(metric, ex, 300, seed=7)
        assert a["low"] <= a["value"] <= a["high"] and a["high"] - a["low"] > 0.05, metric
        assert M.bootstrap(metric, ex, 300, seed=7) == a and M.bootstrap(metric, ex, 300, seed=8) != a
    b = M.bootstrap("bleu", _gen(), 100, seed=0)
    assert b["low"] <= b["value"] <= b["high"]


def test_metrics_command_reads_files_and_prints_one_json_object(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(SYS) + "\n")
    (tmp_path / "r1.txt").write_text("\n".join(REFS[0]) + "\n")
    (tmp_path / "r2.txt").write_text("\n".join(REFS[1]) + "\n")
    out = run_cli(
        "eval",
        "metrics",
        "--metric",
        "bleu,chrf,rouge,meteor",
        "--predictions",
        str(tmp_path / "p.txt"),
        "--references",
        str(tmp_path / "r1.txt"),
        "--references",
        str(tmp_path / "r2.txt"),
        "--json",
    )
    result = json.loads(out.stdout)
    assert set(result) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "meteor"}
    assert result["bleu"] == pytest.approx(48.53, abs=0.01) and "bleu signature: nrefs:2" in out.stderr
    rows = [{"label": int(i % 2), "prediction": int(i % 3 == 0), "score": (i % 7) / 7} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_cli(
        "eval",
        "metrics",
        "--metric",
        "accuracy,f1,roc_auc,mcc,confusion",
        "--predictions",
        str(tmp_path / "c.jsonl"),
        "--bootstrap",
        "200",
        "--json",
        "--png",
        str(tmp_path / "cm.png"),
    )
    result = json.loads(out.stdout)
    assert set(result["accuracy"]) == {"value", "low", "high"} and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    run_cli("eval", "metrics", "--metric", "confusion", "--predictions", str(tmp_path / "c.jsonl"), cwd=tmp_path)
    assert not (tmp_path / "confusion.png").exists()  # a picture only when --png asks for one


@pytest.mark.parametrize(
    "files, message",
    [
        ({"p.txt": "a\nb\nc\n", "r.txt": "a\nb\n"}, "r.txt has 2 references but .* has 3 predictions \\(line 3"),
        ({"p.txt": "", "r.txt": "a\n"}, "holds no prediction"),
        (
            {"p.jsonl": '{"label": 1, "prediction": 1, "score": 0.3}\n{"label": 0, "prediction": 1, "score": NaN}\n'},
            "p.jsonl:2 has a score that is not",
        ),
        (
            {
                "p.jsonl": '{"label": "a", "prediction": "a", "score": [0.5, 0.5]}\n'
                '{"label": "b", "prediction": "a", "score": [0.2, 0.8]}\n'
                '{"label": "c", "prediction": "c", "score": [0.1, 0.9]}\n'
            },
            "scores hold \\[2\\] values per row but there are 3 classes \\(a, b, c\\)",
        ),
        ({"p.jsonl": '{"label": 1, "prediction": 1}\n{"prediction": 0}\n'}, "p.jsonl:2 has no 'label'"),
    ],
)
def test_bad_metric_inputs_name_the_problem(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    generation = "r.txt" in files
    metric = "bleu" if generation else ("roc_auc" if "score" in next(iter(files.values())) else "accuracy")
    args = ["eval", "metrics", "--metric", metric, "--predictions", str(tmp_path / next(iter(files)))]
    if generation:
        args += ["--references", str(tmp_path / "r.txt")]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    import re

    assert re.search(message, proc.stderr), proc.stderr


def test_unknown_metrics_and_missing_wordnet_get_clear_errors():
    import subprocess
    import sys

    with pytest.raises(LlmkitError, match="unknown metric 'blue'"):
        M.compute(["blue"], _gen())
    script = (
        "import nltk; nltk.data.path[:] = ['/nonexistent']\n"  # a machine without WordNet
        "from llmkit.errors import LlmkitError\nfrom llmkit.evaluate import metrics as M\n"
        "try:\n    M.metric_value('meteor', M.Examples(['a b'], [['a b']]))\nexcept LlmkitError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "METEOR needs WordNet 3.0" in out and "make wordnet" in out


def test_numeric_boolean_and_float_labels_keep_their_values():
    from sklearn import metrics as sk

    rng = np.random.default_rng(3)
    # eleven numeric classes: the score columns follow 0, 1, 2, ..., 10 (not "0", "1", "10", "2", ...)
    y = np.arange(11).repeat(6)
    scores = rng.dirichlet(np.ones(11), len(y)) * 0.2 + np.eye(11)[y] * 0.8
    ex = M.Examples(y.tolist(), labels=y.tolist(), scores=scores.tolist())
    assert M.metric_value("roc_auc", ex) == pytest.approx(sk.roc_auc_score(y, scores, multi_class="ovr")) == pytest.approx(1.0)
    assert M.metric_value("confusion", ex)["labels"] == [str(i) for i in range(11)]
    # booleans and floats: the positive class is true / 1.0 and the binary metrics equal sklearn's
    yb = rng.integers(0, 2, 80)
    sb = np.clip(yb * 0.4 + rng.random(80) * 0.6, 0, 1)
    pb = (sb > 0.5).astype(int)
    for cast in (bool, float):
        exb = M.Examples([cast(v) for v in pb], labels=[cast(v) for v in yb], scores=sb.tolist())
        assert M.metric_value("f1", exb) == pytest.approx(sk.f1_score(yb, pb))
        assert M.metric_value("precision_binary", exb) == pytest.approx(sk.precision_score(yb, pb))
        assert M.metric_value("roc_auc", exb) == pytest.approx(sk.roc_auc_score(yb, sb))
        assert M.metric_value("pr_auc", exb) == pytest.approx(sk.average_precision_score(yb, sb))
    with pytest.raises(LlmkitError, match="positive label 'maybe'"):
        M.metric_value("f1", M.Examples([1, 0], labels=[1, 0]), pos_label="maybe")


def test_a_score_at_the_edge_gets_a_wilson_interval_not_a_point():
    from scipy.stats import binomtest

    for right in (0, 10):
        ex = M.Examples(["a"] * 10, labels=(["a"] if right else ["b"]) * 10)
        b = M.bootstrap("accuracy", ex, 200, seed=0)
        ci = binomtest(right, 10).proportion_ci(method="wilson")
        assert b["value"] == right / 10 and (b["low"], b["high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert b["high"] - b["low"] > 0.2  # 10 examples do not make 0% (or 100%) certain


def test_bootstrap_of_a_mean_resamples_example_scores_and_keeps_the_averaging():
    ex = _gen()
    rows = M.per_example("rougeL", ex)
    assert rows.mean() == pytest.approx(M.metric_value("rougeL", ex))
    rng = np.random.default_rng(5)
    expected = np.percentile(rows[rng.integers(0, len(ex), (200, len(ex)))].mean(1), [2.5, 97.5])
    b = M.bootstrap("rougeL", ex, 200, seed=5)
    assert [b["low"], b["high"]] == pytest.approx(expected.tolist())
    # three classes: every resample scores macro F1, even one that happens to miss a class
    y = [0, 1, 2] * 10
    p = [0, 1, 1] * 10
    f1 = M.bootstrap("f1", M.Examples(p, labels=y), 100, seed=0)
    assert f1["value"] == pytest.approx(M.metric_value("f1_macro", M.Examples(p, labels=y)))
    assert f1["high"] < 0.75  # binary F1 of a two-class resample would reach 1.0


def test_metrics_command_takes_the_score_columns_order(tmp_path):
    from sklearn import metrics as sk

    rows = [
        (2, [0.1, 0.2, 0.7]),
        (10, [0.1, 0.8, 0.1]),
        (1, [0.7, 0.2, 0.1]),
        (2, [0.2, 0.3, 0.5]),
        (10, [0.3, 0.6, 0.1]),
        (1, [0.5, 0.3, 0.2]),
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"label": y, "prediction": y, "score": s}) + "\n" for y, s in rows))
    out = run_cli("eval", "metrics", "--metric", "roc_auc", "--predictions", str(tmp_path / "p.jsonl"), "--classes", "1,10,2", "--json")
    order = {1: 0, 10: 1, 2: 2}
    expected = sk.roc_auc_score([order[y] for y, _ in rows], [s for _, s in rows], multi_class="ovr")
    assert json.loads(out.stdout)["roc_auc"] == pytest.approx(expected) == pytest.approx(1.0)
