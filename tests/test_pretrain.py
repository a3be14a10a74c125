"""Pretraining: objectives on hand-made examples, falling losses, exact resume, torchrun equivalence, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import llmkit
from llmkit.errors import LlmkitError
from llmkit.evaluate.perplexity import score_tokens, window_plan
from llmkit.train import objectives
from llmkit.train.pretrain import Budget, PretrainConfig, _Crash, learning_rate, pretrain

# --- objectives -------------------------------------------------------------------------------------------------


def test_causal_lm_shifts_by_one():
    x, y = objectives.causal_lm(torch.tensor([[10, 11, 12, 13]]))
    assert x.tolist() == [[10, 11, 12]] and y.tolist() == [[11, 12, 13]]


def test_masked_lm_picks_15_percent_80_10_10_and_never_special_tokens():
    g = torch.Generator().manual_seed(0)
    special = {0, 1, 2, 3}
    windows = torch.randint(4, 1000, (64, 512), generator=g)
    windows[:, ::7] = 2  # special tokens sprinkled in
    inputs, targets = objectives.masked_lm(windows, mask_id=3, vocab_size=1000, special_ids=special, generator=g)
    picked = targets != -100
    maskable = windows != 2
    assert not (picked & ~maskable).any()  # special tokens never picked
    assert torch.equal(targets[picked], windows[picked])
    assert torch.equal(inputs[~picked], windows[~picked])  # everything else untouched
    rate = picked.sum().item() / maskable.sum().item()
    assert 0.14 < rate < 0.16
    masked = (inputs == 3) & picked
    random = picked & (inputs != 3) & (inputs != windows)
    kept = picked & (inputs == windows)
    n = picked.sum().item()
    assert 0.78 < masked.sum().item() / n < 0.82
    assert 0.08 < random.sum().item() / n < 0.12 and 0.08 < kept.sum().item() / n + 0.001 < 0.12
    assert not torch.isin(inputs[random], torch.tensor(sorted(special))).any()


def test_span_corruption_example_and_reconstruction():
    sentinels = [900 + i for i in range(100)]
    windows = torch.arange(100, 140).view(1, 40)
    enc, tgt = objectives.span_corruption(windows, sentinel_ids=sentinels, eos_id=1, pad_id=0, rng=np.random.default_rng(3))
    enc, tgt = enc[0].tolist(), [t for t in tgt[0].tolist() if t != -100]
    assert enc[-1] == 1 and tgt[-1] == 1  # both end with eos
    spans_in = [t for t in enc if t >= 900]
    spans_out = [t for t in tgt if t >= 900]
    assert spans_in == sentinels[:len(spans_in)] and spans_out == sentinels[:len(spans_in) + 1]  # in order, plus a final one
    noise = len(tgt) - len(spans_out) - 1
    assert noise == 6  # round(40 * 0.15)
    # put the spans back where their sentinels stand: the original window again
    pieces, current = {}, None
    for t in tgt[:-1]:
        if t >= 900:
            current = t
            pieces[current] = []
        else:
            pieces[current].append(t)
    rebuilt = [x for t in enc[:-1] for x in (pieces[t] if t >= 900 else [t])]
    assert rebuilt == windows[0].tolist()
    # "The teacher <X> student" -> "<X> teaches the <Y>"
    dec = objectives.shift_right(torch.tensor([[5, 6, 7, -100]]), start_id=0, pad_id=0)
    assert dec.tolist() == [[0, 5, 6, 7]]


def test_span_lengths_average_three():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(300):
        mask = objectives._span_mask(200, rng, 0.15, 3.0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lengths += list(edges[1::2] - edges[0::2])
        assert mask.sum() == 30 and not mask[0]
    assert 2.7 < np.mean(lengths) < 3.3


def test_budget_and_schedule():
    assert Budget.parse("5m").seconds == 300 and Budget.parse("2000steps").steps == 2000 and Budget.parse("150").steps == 150
    assert Budget.parse("5Mtokens").tokens == 5_000_000 and Budget.parse("1h,100steps").steps == 100
    with pytest.raises(LlmkitError, match="cannot read the budget"):
        Budget.parse("five minutes")
    b = Budget.parse("100steps")
    assert b.exhausted(100, 0, 0) == "budget of 100 steps reached" and b.exhausted(99, 0, 0) is None
    cfg = PretrainConfig(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0) == pytest.approx(1e-4) and learning_rate(cfg, 9, 0.1) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55e-3) and learning_rate(cfg, 100, 1.0) == pytest.approx(1e-4)


# --- perplexity windows ---------------------------------------------------------------------------------------------


def test_window_plan_scores_each_token_once():
    for n, window, stride in [(9, 4, 2), (100, 16, 16), (100, 16, 5), (17, 16, None)]:
        plan = window_plan(n, window, stride)
        scored = [i for s, e, k in plan for i in range(e - k, e)]
        assert len(scored) == len(set(scored))
        if stride and stride < window:
            assert scored == list(range(1, n))
        for s, e, k in plan:
            assert e - s <= window and k <= e - s - 1


def test_score_tokens_equals_a_plain_loop():
    from llmkit.model import build_model, preset

    model = build_model(preset("tiny-llama", vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()
    ids = torch.randint(0, 50, (150,), generator=torch.Generator().manual_seed(1))
    nats, count = score_tokens(model, ids, 16, 6, batch_size=3)
    expected, n = 0.0, 0
    with torch.no_grad():
        for s, e, k in window_plan(150, 16, 6):
            logp = model(ids[None, s:e - 1]).log_softmax(-1)[0]
            for pos in range(e - k, e):
                expected -= logp[pos - s - 1, ids[pos]].item()
                n += 1
    assert count == n == 149 and nats == pytest.approx(expected, rel=1e-5)


# --- training ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Three plays as byte-level BPE shards (vocab 512): real text, seconds to train on."""
    from llmkit.data.prepare import prepare
    from llmkit.data.sources import read_source
    from llmkit.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("shards")
    sources = ["shakespeare:macbeth", "shakespeare:the-tempest", "shakespeare:the-comedy-of-errors", "shakespeare:julius-caesar"]
    tok = train_tokenizer(read_source(sources).texts, "byte-bpe", 512)
    prepare(sources, tok, str(out), val_fraction=0.25, log=lambda m: None)
    return out


def _cfg(small_data, out, **kw) -> PretrainConfig:
    base = dict(data=str(small_data), d_model=64, n_layers=2, n_heads=4, block_size=32, batch_size=8, lr=3e-3, warmup=5,
                budget="40steps", eval_every=20, eval_windows=16, log_every=1, precision="fp32", out=str(out), samples=False)
    base.update(kw)
    return PretrainConfig(**base)


def _train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"}


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder-decoder"])
def test_the_loss_falls_for_all_three_families(small_data, tmp_path, family):
    summary = pretrain(_cfg(small_data, tmp_path / family, family=family, budget="60steps", eval_every=60), log=lambda m: None)
    losses = _train_losses(tmp_path / family)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(56, 61)])
    assert last < first - 0.5, (first, last)  # from ~ln(512) = 6.2 nats
    assert summary["stop_reason"] == "budget of 60 steps reached" and summary["steps"] == 60
    assert np.isfinite(summary["val_loss"]) and summary["val_bpb"] > 0


def test_a_killed_run_resumes_exactly(small_data, tmp_path):
    full = _cfg(small_data, tmp_path / "full", budget="16steps", save_every=6, dropout=0.1)
    pretrain(full, log=lambda m: None)
    killed = _cfg(small_data, tmp_path / "killed", budget="16steps", save_every=6, dropout=0.1)
    with pytest.raises(_Crash):
        pretrain(killed, log=lambda m: None, crash_after_step=8)  # dies after step 8; its last checkpoint is step 6
    with pytest.raises(LlmkitError, match="already holds a run"):
        pretrain(killed, log=lambda m: None)
    summary = pretrain(_cfg(small_data, tmp_path / "killed", budget="16steps", save_every=6, dropout=0.1, resume=True), log=lambda m: None)
    a, b = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in range(7, 17):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert summary["steps"] == 16
    m1, m2 = llmkit.load(tmp_path / "full"), llmkit.load(tmp_path / "killed")
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(v1, v2, atol=1e-5), k


def test_a_corrupt_or_mismatched_checkpoint_is_refused(small_data, tmp_path):
    pretrain(_cfg(small_data, tmp_path, budget="6steps", save_every=3), log=lambda m: None)
    with pytest.raises(LlmkitError, match="another model or tokenizer"):
        pretrain(_cfg(small_data, tmp_path, budget="6steps", d_model=32, resume=True), log=lambda m: None)
    file = tmp_path / "checkpoint" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(LlmkitError, match="corrupt"):
        pretrain(_cfg(small_data, tmp_path, budget="6steps", resume=True), log=lambda m: None)
    with pytest.raises(LlmkitError, match="no checkpoint"):
        pretrain(_cfg(small_data, tmp_path / "new", resume=True), log=lambda m: None)


def _pretrain_cmd(small_data, out, *extra):
    return ["pretrain", "--data", str(small_data), "--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--block-size", "32",
            "--lr", "3e-3", "--warmup", "5", "--eval-every", "20", "--eval-windows", "8", "--log-every", "1", "--precision", "fp32",
            "--out", str(out), *extra]


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_usable(small_data, tmp_path):
    from llmkit.train.checkpoint import find_checkpoint, load_checkpoint

    out = tmp_path / "run"
    env = dict(os.environ, LLMKIT_TEST_CHECKPOINT_PAUSE="60")  # the second checkpoint stalls half-written
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *_pretrain_cmd(small_data, out, "--budget", "30steps", "--save-every", "3")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint.tmp" / "model.safetensors").exists() or not (out / "checkpoint").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = find_checkpoint(out)
    assert ckpt == out / "checkpoint"
    assert load_checkpoint(ckpt)[2]["step"] == 3  # the previous checkpoint, whole
    run_cli(*_pretrain_cmd(small_data, out, "--budget", "8steps", "--save-every", "3", "--resume"))
    assert sorted(_train_losses(out)) == list(range(1, 9))
    assert not (out / "checkpoint.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_processes_follow_the_single_process_loss_curve(small_data, tmp_path, sharding):
    run_cli(*_pretrain_cmd(small_data, tmp_path / "one", "--budget", "10steps", "--batch-size", "8"))
    extra = ["--fsdp"] if sharding == "fsdp" else []
    port = "29517" if sharding == "ddp" else "29518"
    for attempt in range(2):
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                               "-m", "llmkit", *_pretrain_cmd(small_data, tmp_path / "two", "--budget", "10steps", "--batch-size", "4", *extra)],
                              capture_output=True, text=True, timeout=600)
        # FSDP2 over gloo on CPU aborts now and then inside the C++ runtime ("terminate called without an active
        # exception", about 1 run in 6 here); that one failure, and only it, gets a second try.
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), step
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 2
    m1, m2 = llmkit.load(tmp_path / "one"), llmkit.load(tmp_path / "two")  # the final weights, gathered whole under FSDP
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(v1, v2, atol=1e-4), k


@pytest.mark.slow
def test_pretrain_cli_writes_a_complete_run_folder_and_eval_perplexity_reads_it(small_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*_pretrain_cmd(small_data, out, "--budget", "20steps"))
    assert "stopped: budget of 20 steps reached" in proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "report.md", "samples.md",
                 "train_config.json", "checkpoint/state.json"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"tokens_per_s", "mfu", "lr", "loss"} <= set(rows[0]) and any(r["split"] == "val" and "bpb" in r for r in rows)
    result = json.loads(run_cli("eval", "perplexity", "--model", str(out), "--file", "shakespeare:macbeth", "--window", "32",
                                "--max-tokens", "2000", "--json").stdout)
    assert result["tokens"] == sum(k for *_, k in window_plan(2000, 32)) == 1937
    assert 1 < result["perplexity"] < 512 and result["bits_per_byte"] > 0


@pytest.mark.slow
def test_eval_perplexity_of_smollm2_equals_transformers_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmkit.embedded import embedded_path

    text = (tmp_path / "t.txt")
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
                    "of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them.")
    result = json.loads(run_cli("eval", "perplexity", "--model", "smollm2", "--file", str(text), "--window", "512", "--json").stdout)
    path = embedded_path("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([llmkit.load("smollm2").tokenizer.encode(text.read_text())])
    with torch.no_grad():
        loss = ref(ids, labels=ids).loss.item()
    assert result["tokens"] == ids.shape[1] - 1
    assert result["nats_per_token"] == pytest.approx(loss, abs=1e-3)
