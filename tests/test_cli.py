"""The `llmkit` command as a user runs it: help, config files, errors, and each README command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.cli import build_parser, parse_args

from conftest import run_cli, run_in_terminal


def test_help_lists_the_lifecycle_and_every_subcommand_has_examples(capsys):
    out = run_cli("--help").stdout  # once as a user runs it; the subcommands' help in this process (fast)
    for command in ("tokenizer", "data", "model", "attention", "serve", "demo"):
        assert command in out
    for args in (
        ["tokenizer"],
        ["tokenizer", "train"],
        ["tokenizer", "encode"],
        ["tokenizer", "decode"],
        ["tokenizer", "info"],
        ["tokenizer", "compare"],
        ["data"],
        ["data", "prepare"],
        ["data", "info"],
        ["model"],
        ["model", "info"],
        ["model", "export"],
        ["attention"],
        ["demo"],
        ["serve"],
        ["generate"],
        ["chat"],
        ["embed"],
        *[
            ["embed", c]
            for c in (
                "train",
                "text",
                "tokens",
                "similar",
                "analogy",
                "similarity",
                "odd-one-out",
                "cluster",
                "map",
                "evaluate",
                "index",
                "search",
            )
        ],
    ):
        with pytest.raises(SystemExit) as e:
            parse_args([*args, "--help"])
        assert e.value.code == 0 and "examples:" in capsys.readouterr().out, args


def test_every_readme_command_parses():
    """Each `llmkit ...` line of the README's code blocks names a real command with real options."""
    import shlex
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [line.strip() for line in readme.read_text(encoding="utf-8").splitlines() if line.strip().startswith("llmkit ")]
    assert len(lines) > 50
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        if "--help" in argv:
            continue
        args = parse_args(argv)
        assert getattr(args, "_handler", None) is not None or argv in (["tokenizer"], ["data"], ["model"], ["eval"], ["embed"]), line


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    (tmp_path / "tok.yaml").write_text("kind: wordpiece\nvocab-size: 3000\nsource: shakespeare:macbeth\nlowercase: true\n")
    args = parse_args(["tokenizer", "train", "--config", str(tmp_path / "tok.yaml"), "--vocab-size", "5000"])
    assert (args.kind, args.vocab_size, args.source, args.lowercase) == ("wordpiece", 5000, ["shakespeare:macbeth"], True)
    (tmp_path / "bad.json").write_text(json.dumps({"vocab_size": 10, "colour": "red"}))
    proc = run_cli("tokenizer", "train", "--config", str(tmp_path / "bad.json"), check=False)
    assert proc.returncode == 1 and "unknown option(s): colour" in proc.stderr
    assert "`llmkit tokenizer train --help`" in proc.stderr and "bad.json --help" not in proc.stderr  # the command, not the file
    assert build_parser() is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "prepare", "--source", "/no/such/file.txt", "--tokenizer", "smollm2"], "is not a file, folder, glob"),
        (["data", "prepare", "--source", "shakespeare"], "needs --tokenizer"),
        (["tokenizer", "train", "--kind", "bpe", "--vocab-size", "50", "--source", "shakespeare:macbeth"], "too small"),
        (["tokenizer", "encode", "--tokenizer", "/no/such/dir", "hi"], "no tokenizer at"),
        (["data", "info", "/tmp"], "not a prepared shard folder"),
        (["tokenizer", "decode", "--tokenizer", "smollm2", "12", "x"], "whole numbers"),
    ],
)
def test_errors_are_one_clear_line_without_traceback(args, message):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "fix:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = run_cli("--debug", "tokenizer", "encode", "--tokenizer", "/no/such/dir", "hi", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_train_encode_decode_info_round_trip(tmp_path):
    out = tmp_path / "tok"
    run_cli("tokenizer", "train", "--kind", "byte-bpe", "--vocab-size", "1000", "--source", "shakespeare:macbeth", "--out", str(out))
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    text = "Double, double toil and trouble; Fire burn and cauldron bubble. 🔥"
    ids = run_cli("tokenizer", "encode", "--tokenizer", str(out), text).stdout.split()
    assert len(ids) > 5 and all(i.isdigit() for i in ids)
    assert run_cli("tokenizer", "decode", "--tokenizer", str(out), *ids).stdout == text + "\n"
    assert run_cli("tokenizer", "decode", "--tokenizer", str(out), input=" ".join(ids)).stdout == text + "\n"
    assert "'Ġthe'" in run_cli("tokenizer", "encode", "--tokenizer", str(out), "--tokens", "the the").stdout
    info = run_cli("tokenizer", "info", "--tokenizer", str(out)).stdout
    assert "byte-bpe" in info and "sentinels    100" in info


def test_encode_with_the_embedded_tokenizers():
    assert run_cli("tokenizer", "encode", "--tokenizer", "smollm2", "Hello world").stdout.split() == ["19556", "905"]
    ids = run_cli("tokenizer", "encode", "--tokenizer", "minilm", "--add-special-tokens", "hello world").stdout.split()
    assert ids == ["101", "7592", "2088", "102"]


@pytest.mark.slow
def test_compare_prints_the_table_for_all_six_kinds_with_json_and_png(tmp_path):
    js = tmp_path / "cmp.json"
    proc = run_cli("tokenizer", "compare", "--source", "shakespeare/tragedies", "--vocab-size", "2000", "--json", str(js))
    for kind in ("word", "char", "bpe", "wordpiece", "byte-bpe", "unigram"):
        assert kind in proc.stderr
    rows = json.loads(js.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["word", "char", "bpe", "wordpiece", "byte-bpe", "unigram"]
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["byte-bpe"]["unk_rate"] == 0.0
    assert by_kind["char"]["bytes_per_token"] == pytest.approx(1.0, abs=0.05)
    assert by_kind["char"]["tokens_per_word"] > 2.5 * by_kind["bpe"]["tokens_per_word"]
    for r in rows:
        assert r["encode_mb_s"] > 0 and r["raw_tokenizers_mb_s"] > 0 and 0 < r["vocab_used"] <= 1
    png = js.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_data_prepare_and_info_from_the_cli(tmp_path):
    run_cli("tokenizer", "train", "--kind", "bpe", "--vocab-size", "1500", "--source", "shakespeare:hamlet", "--out", str(tmp_path / "tok"))
    proc = run_cli(
        "data",
        "prepare",
        "--source",
        "shakespeare/tragedies",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--near-dedup",
        "--out",
        str(tmp_path / "data"),
    )
    assert "train and" in proc.stdout
    meta = json.loads(run_cli("data", "info", str(tmp_path / "data")).stdout)
    assert meta["documents_read"] == 6 and meta["train_tokens"] > 100_000 and meta["options"]["near_dedup"] is True


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # ~4 minutes alone on 2 cores; the limit leaves room for a machine under load (600 s was too little there)
    args = ("demo", "--out", str(out), "--vocab-size", "2048", "--pretrain-budget", "30steps", "--finetune-budget", "3steps")
    proc = run_cli(*args, timeout=1800)
    assert "report" in proc.stderr
    for name in (
        "report.md",
        "tokenizer_compare.json",
        "tokenizer_compare.png",
        "data/train.bin",
        "data/val.bin",
        "data/meta.json",
        "tokenizers/byte-bpe/tokenizer.json",
        "tokenizers/unigram/tokenizer.json",
        "pretrain/model.safetensors",
        "pretrain/loss.png",
        "finetune/adapter_model.safetensors",
        "finetune/results.json",
    ):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "| byte-bpe |" in report and "validation tokens" in report and "bits per byte" in report
    assert "Shakespeare" in report.split("SmolLM2-135M-Instruct (greedy)")[1]  # it knows who wrote Hamlet
    assert "| exact_match |" in report and "| general_bpb |" in report
    # DPO from the 3-step LoRA on its own answers: a table, or the count that says why there is none
    assert "## Preference training: DPO on the model's own answers" in report
    assert "| rewards/accuracies |" in report or "Too few for DPO" in report
    for name in (
        "embeddings/word2vec/vectors.txt",
        "embeddings/glove/vectors.txt",
        "embeddings/map.png",
        "embeddings/bank.png",
        "embeddings/index/index.faiss",
    ):
        assert (out / name).exists(), name
    assert "| WordSim-353 Spearman |" in report and "*hamlet*" in report.split("a ghost demands revenge")[1]
    assert (out / "web.png").stat().st_size > 20_000 and "![web app](web.png)" in report  # the page, with an answer, in Chromium
    assert "open the app" in proc.stderr and "llmkit serve" in proc.stderr


def test_model_info_prints_every_preset_and_gpt2_has_124m():
    out = run_cli("model", "info", "gpt2", "--json").stdout
    row = json.loads(out)
    assert row["params"] == 124_439_808 and row["flops_per_token_train"] > 6 * 124e6
    table = run_cli("model", "info", "--all").stdout
    for name in ("vaswani", "gpt2", "llama", "bert", "t5", "tiny-gpt", "tiny-llama", "tiny-bert", "tiny-t5"):
        assert name in table
    assert "124,439,808" in table
    proc = run_cli("model", "info", "gpt5", check=False)
    assert proc.returncode == 1 and "no model at 'gpt5'" in proc.stderr
    assert json.loads(run_cli("model", "info", "--model", "gpt2", "--json").stdout) == row  # as the other commands name it
    both = run_cli("model", "info", "gpt2", "--model", "llama", check=False)
    assert both.returncode == 1 and "two models named" in both.stderr
    bad = run_cli("serve", "--prefix-cache-mb", "-1", check=False)  # refused before anything loads
    assert bad.returncode == 1 and "--prefix-cache-mb -1.0 is negative" in bad.stderr


def test_tables_fit_an_80_column_terminal():
    code, screen = run_in_terminal("model", "info", "gpt2", columns=80)
    lines = [line.rstrip() for line in screen.splitlines()]
    assert code == 0 and "124,439,808" in screen and "layernorm (pre)" in screen, screen
    assert max(map(len, lines)) <= 80, screen


@pytest.mark.slow
def test_attention_writes_a_grid_png(tmp_path):
    out = tmp_path / "attn.png"
    proc = run_cli("attention", "--model", "minilm", "--layers", "0,5", "--heads", "0-3", "The cat sat on the mat.", "--out", str(out))
    assert "6 layers x 12 heads" in proc.stdout and "drew layers 0,5 x heads 0-3" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("attention", "--model", "minilm", "--layers", "9", "hi", "--out", str(out), check=False)
    assert bad.returncode == 1 and "layer 9 does not exist" in bad.stderr


@pytest.mark.slow
def test_model_export_of_minilm_loads_in_transformers(tmp_path):
    import torch
    from transformers import BertModel

    import llmkit

    run_cli("model", "export", "--model", "minilm", "--out", str(tmp_path / "hf"))
    ref = BertModel.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = llmkit.load("minilm")
    ids = torch.tensor([ours.tokenizer.encode("Exported and loaded back.", add_special_tokens=True)])
    with torch.no_grad():
        assert (ref(ids).last_hidden_state - ours(ids)).abs().max().item() <= 1e-4
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_deep_models_attention_picture_shows_a_readable_grid_by_default(tmp_path):
    """SmolLM2's 30 layers x 9 heads would be 270 panels: by default 6 layers from the first to the last and 8 heads,
    with room for the title above the grid; chosen layers and heads are drawn as asked."""
    import torch
    from PIL import Image

    from llmkit.model.attention_plot import plot_attention

    maps = [torch.softmax(torch.randn(9, 5, 5), -1) for _ in range(30)]
    layers, heads = plot_attention(["a", "b", "c", "d", "e"], maps, tmp_path / "a.png")
    assert (layers, heads) == ([0, 6, 12, 17, 23, 29], list(range(8)))
    width, height = Image.open(tmp_path / "a.png").size
    assert height < 2000 and width < 2000
    assert plot_attention(["a", "b", "c", "d", "e"], maps, tmp_path / "b.png", layers=[3], heads=[0, 8]) == ([3], [0, 8])


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import llmkit

    assert run_cli("--version").stdout.strip() == f"llmkit {version('llmkit')}" == f"llmkit {llmkit.__version__}"
    assert (Path(llmkit.__file__).parent / "py.typed").exists()  # type checkers see the hints


def test_an_option_typo_is_named_with_the_closest_option():
    proc = run_cli("pretrain", "--bugdet", "5m", check=False)
    assert proc.returncode == 1 and "did you mean --budget?" in proc.stderr and "Traceback" not in proc.stderr


def test_a_long_step_off_a_terminal_logs_a_line_at_intervals(monkeypatch, capsys):
    """Into a log or a pipe no bar is drawn: each task says its count, rate and ETA every LLMKIT_PROGRESS_SECONDS, and
    once when it completes."""
    import time

    from llmkit.progress import progress

    monkeypatch.setenv("LLMKIT_PROGRESS_SECONDS", "0.05")
    with progress("docs") as bar:
        task = bar.add_task("tokenize", total=6)
        for _ in range(6):
            time.sleep(0.06)
            bar.advance(task)
        lines = capsys.readouterr().err.strip().splitlines()
        time.sleep(0.06)
        bar.update(task, completed=6)  # an update after the end says nothing more
        assert capsys.readouterr().err == ""
    assert 3 <= len(lines) <= 6 and all(line.startswith("tokenize: ") for line in lines), lines
    assert " docs/s, eta " in lines[-2] and lines[-1].startswith("tokenize: 6/6 docs, ") and "eta" not in lines[-1]  # a rate from 2 on
    with progress("docs", disable=True) as bar:  # another process speaks
        bar.advance(bar.add_task("quiet", total=1))
    assert capsys.readouterr().err == ""
