"""Benchmark tasks through lm-evaluation-harness: `LlmkitLM` gives what lm-eval's own `hf` model gives on the same
model, its rolling log-likelihood is `llmkit eval perplexity`, evaluations re-run to the same numbers, and the
`lm_eval` command finds the `llmkit` model type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.evaluate.tasks import offline, write_builtin_tasks

from conftest import run_cli

offline()


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    """SmolLM2's Hugging Face export: what lm-eval's `hf` model loads."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    run_cli("model", "export", "--model", "smollm2", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizers_by_kind):
    """A tiny decoder run folder: fast enough for the command-line tests."""
    import torch

    from llmkit.model import build_model, preset
    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["byte-bpe"]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny")
    save_model(
        build_model(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_layers=2, max_seq_len=256)), out, tokenizer=tok
    )
    return out


def _instances(requests, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(requests)]


@pytest.mark.slow
def test_llmkit_lm_equals_lm_eval_hf_on_smollm2(smollm2_hf, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmkit.evaluate.harness import LlmkitLM

    ours = LlmkitLM(model="smollm2", batch_size=4)
    theirs = HFLM(pretrained=str(smollm2_hf), batch_size=4, device="cpu", dtype="float32")
    requests = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " London"),
        ("", "Hello world"),
        ("To be, or not to be:", " that is the question"),
        ("2 + 2 =", " 4"),
    ]
    a, b = ours.loglikelihood(_instances(requests)), theirs.loglikelihood(_instances(requests))
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-3) and ga == gb
    folder = write_builtin_tasks(tmp_path / "tasks", ["shakespeare_cloze", "play", "dates"], n_validation=12, n_train=8)
    manager = TaskManager(include_path=str(folder))
    results = [
        simple_evaluate(
            model=lm,
            tasks=["shakespeare_cloze", "play", "dates"],
            num_fewshot=1,
            limit=12,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )["results"]
        for lm in (ours, theirs)
    ]
    for task, metric in (
        ("shakespeare_cloze", "acc,none"),
        ("shakespeare_cloze", "acc_norm,none"),
        ("play", "acc,none"),
        ("dates", "exact_match,strip"),
    ):
        assert results[0][task][metric] == results[1][task][metric], (task, metric)


def test_rolling_log_likelihood_is_eval_perplexity(tiny_run):
    from llmkit.evaluate.harness import LlmkitLM

    text = Path(tiny_run).parent.joinpath("t.txt")
    text.write_text(" ".join(["Now is the winter of our discontent made glorious summer by this sun of York."] * 12))
    lm = LlmkitLM(model=str(tiny_run), max_length=64)
    (rolling,) = lm.loglikelihood_rolling(_instances([(text.read_text(),)], "loglikelihood_rolling"))
    out = json.loads(
        run_cli(
            "eval",
            "perplexity",
            "--model",
            str(tiny_run),
            "--file",
            str(text),
            "--window",
            "65",
            "--stride",
            "64",
            "--prefix-token",
            "bos",
            "--json",
        ).stdout
    )
    assert out["tokens"] == len(lm.tok_encode(text.read_text())) and out["tokens"] > 128  # several windows, every token scored
    assert -rolling == pytest.approx(out["nats"], rel=1e-4)  # float32 sums in other batch shapes


def test_eval_tasks_rerun_after_a_kill_reuses_answers_and_gives_the_same_numbers(tiny_run, tmp_path):
    args = ["eval", "tasks", "--model", str(tiny_run), "--tasks", "shakespeare_cloze,sort", "--shots", "0,2", "--json"]
    partial = run_cli(*args, "--limit", "3", "--out", str(tmp_path / "a"))  # as if killed after 3 examples
    assert set(json.loads(partial.stdout)) == {"0", "2"}
    resumed = json.loads(run_cli(*args, "--limit", "6", "--out", str(tmp_path / "a")).stdout)
    fresh = json.loads(run_cli(*args, "--limit", "6", "--out", str(tmp_path / "b")).stdout)
    assert resumed == fresh and (tmp_path / "a" / "cache").exists()
    assert {"acc,none", "acc_norm,none"} <= set(fresh["0"]["shakespeare_cloze"]) and "exact_match,strip" in fresh["2"]["sort"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["shots"]["0"]["results"] == fresh["0"] and saved["tasks"] == ["shakespeare_cloze", "sort"]
    bad = run_cli("eval", "tasks", "--model", str(tiny_run), "--tasks", "no_such_task", "--out", str(tmp_path / "c"), check=False)
    assert bad.returncode == 1 and "unknown task(s): no_such_task" in bad.stderr


def test_a_folder_of_task_yaml_runs_and_lm_eval_finds_the_llmkit_model(tiny_run, tmp_path):
    folder = write_builtin_tasks(tmp_path / "mine", ["play"], n_validation=6, n_train=4)
    out = json.loads(
        run_cli("eval", "tasks", "--model", str(tiny_run), "--tasks", str(folder), "--out", str(tmp_path / "r"), "--json").stdout
    )
    assert "acc,none" in out["play"]
    lm_eval = Path(sys.executable).parent / "lm_eval"
    proc = subprocess.run(
        [
            str(lm_eval),
            "--model",
            "llmkit",
            "--model_args",
            f"model={tiny_run}",
            "--batch_size",
            "4",
            "--tasks",
            "play",
            "--include_path",
            str(folder),
            "--limit",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n(run `make` once: it registers llmkit with lm_eval)"
    assert "|play" in proc.stdout and "acc" in proc.stdout


def test_report_sets_runs_side_by_side_and_a_lora_folder_is_a_model(tiny_run, tmp_path):
    import torch

    import llmkit
    from llmkit.model.lora import apply_lora, lora_layers, save_lora

    model = llmkit.load(tiny_run)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    save_lora(model, tmp_path / "lora", base_model_name=str(tiny_run))
    ids = torch.tensor([model.tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        merged = llmkit.load(tmp_path / "lora")
        assert (merged(ids) - model(ids)).abs().max().item() < 1e-4 and merged.tokenizer is not None
    for name, m in (("base", str(tiny_run)), ("lora", str(tmp_path / "lora"))):
        run_cli("eval", "tasks", "--model", m, "--tasks", "play,sort", "--limit", "4", "--out", str(tmp_path / name))
    out = run_cli("eval", "report", "--runs", str(tmp_path / "base"), str(tmp_path / "lora"), "--out", str(tmp_path / "r" / "report.md"))
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {str(tiny_run), str(tmp_path / "lora")} and {r["task"] for r in rows} == {"play", "sort"}
    assert all(r["n"] == 4 for r in rows) and any(r["low"] is not None and r["low"] <= r["value"] <= r["high"] for r in rows)
    assert (tmp_path / "r" / "report.png").read_bytes()[:4] == b"\x89PNG" and "| model | task |" in out.stdout


def test_shared_context_batches_fit_the_context_and_cache_each_batch_as_it_ends(tiny_run):
    import torch

    from llmkit.evaluate.harness import LlmkitLM

    lm = LlmkitLM(model=str(tiny_run), max_length=64, batch_size=4)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, 200, (n,), generator=g).tolist()  # noqa: E731
    long_ctx, short_ctx = ids(60), ids(20)
    # each request fits alone (60 + 3, 20 + 30); the long context with the long choices would not
    requests = [(("a", str(k)), long_ctx, ids(3)) for k in range(2)] + [(("b", str(k)), short_ctx, ids(30)) for k in range(2)]
    written = []

    class Hook:
        def add_partial(self, kind, key, value):
            written.append(key)

    lm.cache_hook = Hook()
    shared = lm._loglikelihood_tokens(requests)
    alone = [lm._score_causal([r])[0] for r in requests]
    for (a, ga), (b, gb) in zip(shared, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert sorted(written) == sorted(r[0] for r in requests)
    # a run killed in its second batch keeps the first batch's answers in the cache
    written.clear()
    calls = []
    real = lm._score_shared

    def dies_second_time(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    lm._score_shared = dies_second_time
    with pytest.raises(KeyboardInterrupt):
        lm._loglikelihood_tokens(requests)
    assert sorted(written) == [("a", "0"), ("a", "1")]


def test_the_request_cache_is_keyed_by_the_weights(tiny_run):
    import torch

    from llmkit.evaluate.harness import LlmkitLM

    lm = LlmkitLM(model=str(tiny_run))
    before = lm.fingerprint
    assert LlmkitLM(model=str(tiny_run)).fingerprint == before
    with torch.no_grad():
        next(lm.model.parameters()).add_(0.01)
    lm._fingerprint = None
    assert lm.fingerprint != before


def test_report_keeps_unbounded_metrics_and_names_two_runs_of_one_model(tmp_path):
    from llmkit.evaluate.report import report

    for name, ppl in (("plain", 18.5), ("chat", 21.0)):
        result = {
            "model": "smollm2",
            "shots": {
                "0": {
                    "results": {
                        "lambada": {"perplexity,none": ppl, "perplexity_stderr,none": 0.6, "acc,none": 0.4, "acc_stderr,none": 0.3}
                    },
                    "n-samples": {"lambada": {"effective": 50}},
                }
            },
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    rows = report([tmp_path / "plain", tmp_path / "chat"], tmp_path / "r.md")["rows"]
    ppl = next(r for r in rows if r["metric"] == "perplexity" and "plain" in r["model"])
    assert ppl["low"] == pytest.approx(18.5 - 1.96 * 0.6) and ppl["high"] == pytest.approx(18.5 + 1.96 * 0.6)
    acc = next(r for r in rows if r["metric"] == "acc" and "plain" in r["model"])
    assert acc["low"] == 0.0 and acc["high"] == pytest.approx(0.4 + 1.96 * 0.3)
    assert len({r["model"] for r in rows}) == 2 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def _lm_eval(*args: str, out: Path) -> dict:
    """`lm_eval ARGS --output_path OUT` as a user runs it; the results JSON it writes."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), *args, "--output_path", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n(run `make` once: it registers llmkit with lm_eval)"
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def test_lm_eval_keeps_its_own_models_beside_llmkit_and_both_score_alike(tiny_run, tmp_path):
    """Registering llmkit must not hide lm-eval's own models: `lm_eval --model hf` on the model's Hugging Face export and
    `lm_eval --model llmkit` on the run folder both run from the command line, on the same task, to the same scores;
    `simple_evaluate(model="hf")` needs no extra import; a process that never uses lm-eval never imports it."""
    export = tmp_path / "hf"
    run_cli("model", "export", "--model", str(tiny_run), "--out", str(export))
    folder = write_builtin_tasks(tmp_path / "tasks", ["play"], n_validation=8, n_train=4)
    common = ["--tasks", "play", "--include_path", str(folder), "--batch_size", "4", "--limit", "8"]
    hf = _lm_eval("--model", "hf", "--model_args", f"pretrained={export}", *common, out=tmp_path / "out-hf")
    ours = _lm_eval("--model", "llmkit", "--model_args", f"model={tiny_run}", *common, out=tmp_path / "out-llmkit")
    for key in ("acc,none", "acc_norm,none"):
        assert ours["play"][key] == pytest.approx(hf["play"][key]), key

    api = (
        "from lm_eval import simple_evaluate; from lm_eval.tasks import TaskManager; "
        f"r = simple_evaluate(model='hf', model_args='pretrained={export}', tasks=['play'], "
        f"task_manager=TaskManager(include_path='{folder}'), limit=4, device='cpu'); print(r['results']['play']['acc,none'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", api], capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= float(proc.stdout.strip().splitlines()[-1]) <= 1.0

    startup = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'torch', 'transformers')))"
    proc = subprocess.run([sys.executable, "-c", startup], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"
