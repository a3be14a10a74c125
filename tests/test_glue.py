"""GLUE and SuperGLUE: small files in the exact official layouts, parsed and scored with each task's official metric
(checked against scikit-learn / scipy), and a MiniLM fine-tune on such a file that learns it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from llmkit.errors import LlmkitError
from llmkit.evaluate import glue

from conftest import run_cli


def _tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


MNLI_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "label2",
    "label3",
    "label4",
    "label5",
    "gold_label",
]


def test_glue_files_parse_in_their_official_layouts(tmp_path):
    d = tmp_path / "glue_data"
    _tsv(d / "CoLA" / "dev.tsv", None, [("gj04", 1, "", "Our friends won't buy this analysis."), ("gj04", 0, "*", "They drank the pub.")])
    _tsv(d / "SST-2" / "dev.tsv", ["sentence", "label"], [("a gorgeous film", 1), ("dull and lifeless", 0)])
    _tsv(d / "MRPC" / "dev.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], [(1, 11, 12, "He said hi.", "He greeted us.")])
    _tsv(d / "QQP" / "dev.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], [(1, 2, 3, "How old?", "What age?", 1)])
    _tsv(
        d / "STS-B" / "dev.tsv",
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        [(0, "main-captions", "MSRvid", "2012test", 1, "none", "none", "A man plays.", "A man is playing.", "4.750")],
    )
    _tsv(
        d / "MNLI" / "dev_matched.tsv",
        MNLI_HEADER,
        [(0, 1, "1e", "fiction", "(", "(", "(", "(", "He runs.", "He moves.") + ("entailment",) * 6],
    )
    _tsv(
        d / "MNLI" / "dev_mismatched.tsv",
        MNLI_HEADER,
        [(0, 1, "1n", "letters", "(", "(", "(", "(", "It rains.", "It is dry.") + ("contradiction",) * 6],
    )
    _tsv(d / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"], [(0, "Who ran?", "Ann ran.", "entailment")])
    _tsv(d / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [(0, "A cat sat.", "An animal sat.", "entailment")])
    _tsv(d / "WNLI" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [(0, "The cup fell; it broke.", "The cup broke.", 1)])
    cola = glue.read_rows(glue.get_task("cola"), d / "CoLA" / "dev.tsv")
    assert [(r.text, r.label) for r in cola] == [("Our friends won't buy this analysis.", "1"), ("They drank the pub.", "0")]
    mrpc = glue.read_rows(glue.get_task("mrpc"), d / "MRPC" / "dev.tsv")[0]
    assert (mrpc.text, mrpc.text_pair, mrpc.label) == ("He said hi.", "He greeted us.", "1")
    assert glue.read_rows(glue.get_task("stsb"), d / "STS-B" / "dev.tsv")[0].label == pytest.approx(4.75)
    assert (
        glue.read_rows(glue.get_task("mnli-m"), glue.task_file(glue.get_task("mnli-m"), d / "MNLI", "validation"))[0].label == "entailment"
    )
    assert (
        glue.read_rows(glue.get_task("mnli-mm"), glue.task_file(glue.get_task("mnli-mm"), d / "MNLI", "validation"))[0].label
        == "contradiction"
    )
    for name, folder in (("qqp", "QQP"), ("qnli", "QNLI"), ("rte", "RTE"), ("wnli", "WNLI"), ("sst2", "SST-2")):
        rows = glue.read_rows(glue.get_task(name), d / folder / "dev.tsv")
        assert rows and all(r.label in glue.get_task(name).labels for r in rows), name
    _tsv(d / "BAD" / "dev.tsv", ["index", "text"], [(0, "x")])
    with pytest.raises(Exception, match="has no column 'sentence1'"):
        glue.read_rows(glue.get_task("rte"), d / "BAD" / "dev.tsv")


def test_superglue_files_parse_and_candidate_tasks_group_their_rows(tmp_path):
    d = tmp_path / "superglue"
    _jsonl(d / "BoolQ" / "val.jsonl", [{"question": "is it red", "passage": "It is red.", "idx": 0, "label": True}])
    _jsonl(d / "CB" / "val.jsonl", [{"premise": "P", "hypothesis": "H", "label": "neutral", "idx": 0}])
    _jsonl(
        d / "COPA" / "val.jsonl",
        [
            {
                "premise": "The man broke his toe.",
                "choice1": "He dropped a hammer.",
                "choice2": "He sang.",
                "question": "cause",
                "label": 0,
                "idx": 0,
            }
        ],
    )
    _jsonl(
        d / "MultiRC" / "val.jsonl",
        [
            {
                "idx": 0,
                "passage": {
                    "text": "Tom has a cat.",
                    "questions": [
                        {
                            "question": "What has Tom?",
                            "idx": 0,
                            "answers": [{"text": "a cat", "idx": 0, "label": 1}, {"text": "a dog", "idx": 1, "label": 0}],
                        }
                    ],
                },
            }
        ],
    )
    _jsonl(
        d / "ReCoRD" / "val.jsonl",
        [
            {
                "idx": 0,
                "passage": {"text": "Paris and Rome met.", "entities": [{"start": 0, "end": 4}, {"start": 10, "end": 13}]},
                "qas": [{"query": "@placeholder is in France.", "idx": 0, "answers": [{"start": 0, "end": 4, "text": "Paris"}]}],
            }
        ],
    )
    _jsonl(
        d / "WiC" / "val.jsonl",
        [
            {
                "word": "bank",
                "sentence1": "river bank",
                "sentence2": "bank loan",
                "label": False,
                "idx": 0,
                "start1": 6,
                "end1": 10,
                "start2": 0,
                "end2": 4,
            }
        ],
    )
    _jsonl(
        d / "WSC" / "val.jsonl",
        [
            {
                "text": "Ann said she won.",
                "target": {"span1_text": "Ann", "span2_text": "she", "span1_index": 0, "span2_index": 2},
                "label": True,
                "idx": 0,
            }
        ],
    )
    _jsonl(d / "AX-g" / "AX-g.jsonl", [{"premise": "P", "hypothesis": "H", "label": "entailment", "idx": 0, "pair_id": 7}])
    copa = glue.read_rows(glue.get_task("copa"), d / "COPA" / "val.jsonl")
    assert [(r.text, r.text_pair, r.label, r.group) for r in copa] == [
        ("The man broke his toe because", "He dropped a hammer.", "1", "copa-0"),
        ("The man broke his toe because", "He sang.", "0", "copa-0"),
    ]
    multirc = glue.read_rows(glue.get_task("multirc"), d / "MultiRC" / "val.jsonl")
    assert [r.label for r in multirc] == ["1", "0"] and len({r.group for r in multirc}) == 1
    record = glue.read_rows(glue.get_task("record"), d / "ReCoRD" / "val.jsonl")
    assert sorted(r.candidate for r in record) == ["Paris", "Rome"] and record[0].gold == ["Paris"]
    assert any(r.text_pair == "Paris is in France." for r in record)
    assert glue.read_rows(glue.get_task("boolq"), d / "BoolQ" / "val.jsonl")[0].label == "True"
    assert glue.read_rows(glue.get_task("wic"), d / "WiC" / "val.jsonl")[0].label == "False"
    assert glue.read_rows(glue.get_task("axg"), glue.task_file(glue.get_task("axg"), d / "AX-g", "validation"))[0].pair_id == 7
    with pytest.raises(LlmkitError, match=r"SST-2/train.tsv does not exist \(fix"):  # the file itself named, not a path inside it
        glue.task_file(glue.get_task("sst2"), d / "SST-2" / "train.tsv", "train")
    _jsonl(d / "CB2" / "val.jsonl", [{"premise": "P", "label": "neutral"}])
    with pytest.raises(Exception, match="lacks the field 'hypothesis'"):
        glue.read_rows(glue.get_task("cb"), d / "CB2" / "val.jsonl")


def test_official_metrics_equal_sklearn_and_scipy():
    from scipy import stats
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(str).tolist()
    p = [a if rng.random() < 0.7 else str(1 - int(a)) for a in y]
    rows = [glue.Row("t", None, a) for a in y]
    assert glue.score(glue.get_task("cola"), rows, p)["mcc"] == pytest.approx(sk.matthews_corrcoef(y, p))
    mrpc = glue.score(glue.get_task("mrpc"), rows, p)
    assert mrpc["f1"] == pytest.approx(sk.f1_score(y, p, pos_label="1")) and mrpc["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert mrpc["score"] == pytest.approx(100 * (mrpc["f1"] + mrpc["accuracy"]) / 2)
    gold = rng.random(40) * 5
    pred = gold + rng.normal(0, 1, 40)
    sts = glue.score(glue.get_task("stsb"), [glue.Row("a", "b", float(g)) for g in gold], pred.tolist())
    assert sts["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0]) and sts["spearman"] == pytest.approx(
        stats.spearmanr(pred, gold)[0]
    )
    labels = ["contradiction", "entailment", "neutral"]
    yc = [labels[i] for i in rng.integers(0, 3, 50)]
    pc = [a if rng.random() < 0.6 else labels[rng.integers(0, 3)] for a in yc]
    cb = glue.score(glue.get_task("cb"), [glue.Row("p", "h", a) for a in yc], pc)
    assert cb["f1_macro"] == pytest.approx(sk.f1_score(yc, pc, average="macro")) and cb["accuracy"] == pytest.approx(
        sk.accuracy_score(yc, pc)
    )
    # MultiRC: F1 over every answer, exact match per question
    rows = [
        glue.Row("p", "q0 a", "1", "q0"),
        glue.Row("p", "q0 b", "0", "q0"),
        glue.Row("p", "q1 a", "1", "q1"),
        glue.Row("p", "q1 b", "1", "q1"),
    ]
    m = glue.score(glue.get_task("multirc"), rows, ["1", "0", "1", "0"])
    assert m["exact_match"] == 0.5 and m["f1a"] == pytest.approx(sk.f1_score(["1", "0", "1", "1"], ["1", "0", "1", "0"], pos_label="1"))
    # ReCoRD: the best-scored entity, token F1 and exact match against the best gold answer
    rec = [
        glue.Row("p", "Paris ...", "1", "g", gold=["Paris", "Paris, France"], candidate="Paris"),
        glue.Row("p", "Rome ...", "0", "g", gold=["Paris", "Paris, France"], candidate="Rome"),
    ]
    assert glue.score(glue.get_task("record"), rec, [None, None], [0.9, 0.1]) == {"token_f1": 1.0, "exact_match": 1.0, "score": 100.0}
    assert glue.score(glue.get_task("record"), rec, [None, None], [0.1, 0.9])["token_f1"] == 0.0
    # COPA: the better alternative of each example
    copa = [glue.Row("p", "a", "1", "e0"), glue.Row("p", "b", "0", "e0"), glue.Row("p", "c", "0", "e1"), glue.Row("p", "d", "1", "e1")]
    assert glue.score(glue.get_task("copa"), copa, [None] * 4, [0.7, 0.2, 0.6, 0.4])["accuracy"] == 0.5
    # AX-g: accuracy and the share of sentence pairs (differing only in gender) predicted alike
    axg = [
        glue.Row("p", "h", "entailment", pair_id=1),
        glue.Row("p", "h", "entailment", pair_id=1),
        glue.Row("p", "h", "not_entailment", pair_id=2),
        glue.Row("p", "h", "not_entailment", pair_id=2),
    ]
    r = glue.score(glue.get_task("axg"), axg, ["entailment", "entailment", "entailment", "not_entailment"])
    assert r["accuracy"] == 0.75 and r["gender_parity"] == 0.5
    # the leaderboards' own rows: BERT-large on GLUE (80.5) and the human baseline on SuperGLUE (89.8)
    bert = {
        "cola": 60.5,
        "sst2": 94.9,
        "mrpc": (89.3 + 85.4) / 2,
        "stsb": (87.6 + 86.5) / 2,
        "qqp": (72.1 + 89.3) / 2,
        "mnli-m": 86.7,
        "mnli-mm": 85.9,
        "qnli": 92.7,
        "rte": 70.1,
        "wnli": 65.1,
    }
    human = {
        "boolq": 89.0,
        "cb": (95.8 + 98.9) / 2,
        "copa": 100.0,
        "multirc": (81.8 + 51.9) / 2,
        "record": (91.7 + 91.3) / 2,
        "rte-superglue": 93.6,
        "wic": 80.0,
        "wsc": 100.0,
        "axb": 76.6,
        "axg": (99.3 + 99.7) / 2,
    }
    assert round(glue.glue_score(bert)["glue"], 1) == 80.5 and round(glue.glue_score(human)["superglue"], 1) == 89.8
    assert glue.glue_score({**bert, **human}).keys() == {"glue", "superglue"}


def _sentiment_rows(n, seed):
    good = "wonderful superb delightful moving brilliant charming gorgeous warm funny clever".split()
    bad = "dull tedious awful boring clumsy lifeless bland dreary messy stale".split()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(good if label else bad, 2)
        rows.append((f"a {words[0]} and {words[1]} film about {rng.choice(['love', 'war', 'a city', 'a family'])}", label))
    return rows


@pytest.mark.slow
def test_a_minilm_fine_tuned_on_an_official_sst2_file_learns_it(tmp_path):
    d = tmp_path / "SST-2"
    _tsv(d / "train.tsv", ["sentence", "label"], _sentiment_rows(200, 0))
    _tsv(d / "dev.tsv", ["sentence", "label"], _sentiment_rows(40, 1))
    out = run_cli(
        "finetune",
        "--model",
        "minilm",
        "--method",
        "lora",
        "--data",
        str(d / "train.tsv"),
        "--glue",
        "sst2",
        "--budget",
        "30steps",
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--out",
        str(tmp_path / "run"),
        "--json",
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["after"]["accuracy"] >= 0.85 and result["after"]["accuracy"] > result["before"]["accuracy"]
    scored = json.loads(run_cli("eval", "glue", "--task", "sst2", "--data", str(d), "--model", str(tmp_path / "run"), "--json").stdout)
    assert scored["tasks"]["sst2"]["accuracy"] == pytest.approx(result["after"]["accuracy"]) and scored["tasks"]["sst2"]["n"] == 40


@pytest.mark.slow
def test_a_decoder_scores_glue_zero_shot_by_label_words(tmp_path):
    d = tmp_path / "SST-2"
    _tsv(d / "dev.tsv", ["sentence", "label"], _sentiment_rows(24, 2))
    _tsv(d / "train.tsv", ["sentence", "label"], _sentiment_rows(10, 3))
    out = json.loads(run_cli("eval", "glue", "--task", "sst2", "--data", str(tmp_path), "--model", "smollm2", "--json").stdout)
    assert out["tasks"]["sst2"]["accuracy"] >= 0.75 and out["score"] == pytest.approx(100 * out["tasks"]["sst2"]["accuracy"])
    few = json.loads(
        run_cli(
            "eval", "glue", "--task", "sst2", "--data", str(tmp_path), "--model", "smollm2", "--shots", "2", "--limit", "8", "--json"
        ).stdout
    )  # SmolLM2-135M leans to one label after examples: the run works, the number is its own
    assert few["shots"] == 2 and few["tasks"]["sst2"]["n"] == 8


def test_diagnostics_are_not_fine_tuned_and_whole_number_labels_are_classes(tmp_path):
    from llmkit.data.tasks import Example
    from llmkit.finetune.recipe import label_kind

    (tmp_path / "AX-b").mkdir()
    (tmp_path / "AX-b" / "AX-b.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": "entailment", "idx": 0}\n')
    out = run_cli("finetune", "--model", "minilm", "--glue", "axb", "--data", str(tmp_path), "--out", str(tmp_path / "run"), check=False)
    assert out.returncode != 0 and "diagnostic set with no training data" in out.stderr and "rte-superglue" in out.stderr
    rows = [Example(text="t", label=v) for v in (4, 3.5, 1)]
    assert label_kind(rows) == "regression" and [r.label for r in rows] == [4.0, 3.5, 1.0]
    rows = [Example(text="t", label=v) for v in (4, 0, 5)]
    assert label_kind(rows) == "classification" and [r.label for r in rows] == ["4", "0", "5"]
    rows = [Example(text="t", label=v) for v in (4, 0, 5)]
    assert label_kind(rows, regression=True) == "regression" and [r.label for r in rows] == [4.0, 0.0, 5.0]
    with pytest.raises(LlmkitError, match="--regression needs a number"):
        label_kind([Example(text="t", label="pos")], regression=True)


def test_few_shot_examples_are_drawn_per_question_from_every_label():
    class Recorder:
        def __init__(self):
            self.contexts = []

        def loglikelihood(self, instances, disable_tqdm=False):
            self.contexts += [i.arguments[0] for i in instances]
            return [(-float(len(i.arguments[1])), False) for i in instances]

    train = [glue.Row(f"passage {k}", f"Question: q{k}\nAnswer: a{k}", str(k % 2), group=f"t{k}") for k in range(20)]
    rows = [glue.Row(f"text {k}", f"Question: v{k}\nAnswer: b", "1", group=f"v{k // 2}") for k in range(12)]
    lm = Recorder()
    glue.evaluate_decoder(lm, glue.get_task("multirc"), rows, train, shots=2, seed=0)
    demos = {c.split("text ")[0] for c in lm.contexts}
    assert len(demos) > 1  # questions get their own examples ...
    assert all(len({c.split("text ")[0] for c, r in zip(lm.contexts[::2], rows) if r.group == g}) == 1 for g in {r.group for r in rows})
    joined = "".join(demos)
    assert "yes or no?\nAnswer: no" in joined and "yes or no?\nAnswer: yes" in joined  # ... of both labels
    with pytest.raises(LlmkitError, match="3 shots asked for but the training file has 2"):
        glue.evaluate_decoder(
            lm,
            glue.get_task("copa"),
            rows[:2],
            [glue.Row("p", "a", "1", "g0"), glue.Row("p", "b", "0", "g0"), glue.Row("q", "c", "1", "g1")],
            shots=3,
        )
