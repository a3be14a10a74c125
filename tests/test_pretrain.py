"""Pretraining: objectives on hand-made examples, falling losses, exact resume, torchrun equivalence, kill -9."""

from __future__ import annotations

import json
import math
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

import llmkit
from llmkit.errors import LlmkitError
from llmkit.evaluate.perplexity import score_tokens, window_plan
from llmkit.train import objectives
from llmkit.train.pretrain import PretrainConfig, Pretraining, pretrain
from llmkit.train.runtime import Budget, learning_rate

from conftest import run_cli


class _Crash(Exception):
    """Stops a run as a kill would (no final save)."""


class _Killed(Pretraining):
    """A run killed after step `after` (the hook runs after each step and its checkpoint)."""

    def __init__(self, cfg, after: int, **kw):
        super().__init__(cfg, **kw)
        self.after = after

    def after_step(self) -> None:
        if self.step >= self.after:
            raise _Crash(self.step)


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
    assert spans_in == sentinels[: len(spans_in)] and spans_out == sentinels[: len(spans_in) + 1]  # in order, plus a final one
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
    cfg = PretrainConfig(lr=1e-3, warmup=10, min_lr_ratio=0.1, schedule="cosine")
    assert learning_rate(cfg, 0, 0) == pytest.approx(1e-4) and learning_rate(cfg, 9, 0.1) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55e-3) and learning_rate(cfg, 100, 1.0) == pytest.approx(1e-4)


def test_a_time_budget_stops_after_four_epochs_and_a_step_budget_stays_exact():
    timed, steps = Budget.parse("30m"), Budget.parse("30m,500steps")
    timed.limit_epochs(None, 1000)
    steps.limit_epochs(None, 1000)
    assert timed.epoch_limit == 4000 and steps.epoch_limit is None  # the default limit: a budget of time alone
    assert timed.exhausted(10, 3999, 60) is None and "4 epochs" in timed.exhausted(11, 4000, 60)
    assert timed.progress(5, 2000, 60) == pytest.approx(0.5)  # the schedule runs on the nearer limit
    steps.limit_epochs(2, 1000)  # an explicit limit holds for every budget; 0 lifts it
    assert steps.epoch_limit == 2000 and "2 epochs" in steps.exhausted(4, 2000, 1)
    timed.limit_epochs(0, 1000)
    assert timed.epoch_limit is None and timed.exhausted(10**6, 10**9, 60) is None


def test_a_narrower_d_model_keeps_the_presets_mlp_ratio():
    from llmkit.train.pretrain import build

    assert build(PretrainConfig(), 100).config.d_ff == 576  # cpu-modern: 3 x 192
    assert build(PretrainConfig(d_model=64, n_heads=2), 100).config.d_ff == 192
    assert build(PretrainConfig(d_model=64, n_heads=2, model_options={"d_ff": 100}), 100).config.d_ff == 100
    assert build(PretrainConfig(preset="cpu-gpt", d_model=64, n_heads=2), 100).config.d_ff == 256  # no d_ff in the preset: 4x


def test_evaluation_windows_spread_over_the_shard():
    from llmkit.train.pretrain import eval_starts

    assert eval_starts(1000, 10, 4) == [120, 370, 620, 870]  # the middle window of each quarter, not the first one's opening
    assert eval_starts(95, 10, 64) == [i * 10 for i in range(9)]  # fewer windows than asked: all of them
    assert eval_starts(10, 10, 4) == [0]


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
            logp = model(ids[None, s : e - 1]).log_softmax(-1)[0]
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
    base = dict(
        data=str(small_data),
        d_model=64,
        n_layers=2,
        n_heads=4,
        block_size=32,
        batch_size=8,
        lr=3e-3,
        warmup=5,
        budget="40steps",
        eval_every=20,
        eval_windows=16,
        log_every=1,
        precision="fp32",
        out=str(out),
        samples=False,
    )
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


def test_a_time_budget_stops_after_four_epochs_by_default(small_data, tmp_path):
    from llmkit.data.loader import WindowLoader

    cfg = _cfg(small_data, tmp_path, budget="10m", d_model=16, n_layers=1, batch_size=256, block_size=16, eval_every=10**6)
    summary = pretrain(cfg, log=lambda m: None)
    per_epoch = WindowLoader(small_data, "train", window=17, batch_size=256, stride=16).windows_per_epoch()
    assert summary["steps"] == math.ceil(4 * per_epoch / 256) and summary["stop_reason"].startswith("4 epochs")
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert max(lrs) == pytest.approx(cfg.lr) and lrs[-1] < 0.2 * cfg.lr  # the decay ran to its end on the epochs, not the clock


def test_max_epochs_stops_the_run_and_the_final_evaluation_scores_the_whole_validation_shard(small_data, tmp_path):
    from llmkit.data.loader import WindowLoader, open_shard

    cfg = _cfg(small_data, tmp_path, budget="1000steps", max_epochs=0.25, eval_every=1000)
    summary = pretrain(cfg, log=lambda m: None)
    per_epoch = WindowLoader(small_data, "train", window=33, batch_size=8, stride=32).windows_per_epoch()
    assert summary["steps"] == math.ceil(0.25 * per_epoch / 8) and "0.25 epochs" in summary["stop_reason"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("final")]
    assert len(final) == 1 and final[0]["windows"] == summary["val_windows"] == len(open_shard(small_data, "val")) // 33
    assert final[0]["bpb"] == summary["val_bpb"] and f"validation ({final[0]['windows']} windows)" in (tmp_path / "report.md").read_text()
    # resumed with a larger limit: the finished run's final score leaves metrics.jsonl, the new one is added
    pretrain(_cfg(small_data, tmp_path, budget="1000steps", max_epochs=0.3, eval_every=1000, resume=True), log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("final")] == [math.ceil(0.3 * per_epoch / 8)]


def test_a_killed_run_resumes_exactly(small_data, tmp_path):
    full = _cfg(small_data, tmp_path / "full", budget="16steps", save_every=6, dropout=0.1)
    pretrain(full, log=lambda m: None)
    killed = _cfg(small_data, tmp_path / "killed", budget="16steps", save_every=6, dropout=0.1)
    with pytest.raises(_Crash):
        _Killed(killed, 8, log=lambda m: None).run()  # dies after step 8; its last checkpoint is step 6
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


def test_a_run_killed_before_its_first_evaluation_resumes_from_a_timed_checkpoint(small_data, tmp_path):
    cfg = _cfg(small_data, tmp_path, budget="12steps", eval_every=1000, save_minutes=1e-6)  # due again after every step
    with pytest.raises(_Crash):
        _Killed(cfg, 5, log=lambda m: None).run()
    summary = pretrain(_cfg(small_data, tmp_path, budget="12steps", eval_every=1000, resume=True), log=lambda m: None)
    assert summary["steps"] == 12 and min(_train_losses(tmp_path)) > 0
    assert sorted(_train_losses(tmp_path)) == list(range(1, 13))  # steps 1-5 kept from before the kill, 6-12 after


def test_a_compiled_run_compiles_before_its_budget_starts_and_without_graph_breaks(small_data, tmp_path, caplog):
    said: list[str] = []
    with caplog.at_level("WARNING"):
        summary = pretrain(_cfg(small_data, tmp_path, budget="4s", eval_every=1000, compile=True), log=said.append)
    assert any(m.startswith("compiling the training step") for m in said) and any(m.startswith("compiled in") for m in said)
    first = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train")
    assert first["elapsed"] < 2.0 and summary["steps"] > 10  # the clock started after the compile (seconds on 2 cores)
    assert not [r.getMessage() for r in caplog.records if "Graph break" in r.getMessage()]


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
    return [
        "pretrain",
        "--data",
        str(small_data),
        "--d-model",
        "64",
        "--n-layers",
        "2",
        "--n-heads",
        "4",
        "--block-size",
        "32",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--eval-every",
        "20",
        "--eval-windows",
        "8",
        "--log-every",
        "1",
        "--precision",
        "fp32",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_usable(small_data, tmp_path):
    from llmkit.train.checkpoint import find_checkpoint, load_checkpoint

    out = tmp_path / "run"
    env = dict(os.environ, LLMKIT_TEST_CHECKPOINT_PAUSE="60")  # the second checkpoint stalls half-written
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", *_pretrain_cmd(small_data, out, "--budget", "30steps", "--save-every", "3")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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


def _torchrun(args: list[str], port: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m llmkit ARGS`. FSDP2 over gloo on CPU aborts now and then inside the C++ runtime
    ("terminate called without an active exception", about 1 run in 6 here); that one failure, and only it, gets a
    second try."""
    for _attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "llmkit", *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding, family, optimizer", [("ddp", "encoder", "adamw"), ("fsdp", "decoder", "adamw"), ("fsdp", "decoder", "muon")]
)
def test_torchrun_two_processes_follow_the_single_process_loss_curve(small_data, tmp_path, sharding, family, optimizer):
    """2 ranks x 4 rows (DDP: 2 ranks x 2 rows x 2 accumulation steps) = 1 process x 8 rows, loss for loss. The encoder's
    masked LM scores a different number of tokens in every row, so this holds only if every target token weighs the
    same, across micro-steps and ranks. Muon (on FSDP2's sharded parameters) amplifies the few roundings the
    all-reduce's other summation order moves: its curve agrees to 2e-3 instead of 1e-4."""
    opt = ["--optimizer", optimizer]
    run_cli(*_pretrain_cmd(small_data, tmp_path / "one", "--budget", "10steps", "--batch-size", "8", "--family", family, *opt))
    extra = ["--fsdp", "--batch-size", "4"] if sharding == "fsdp" else ["--batch-size", "2", "--grad-accum", "2"]
    proc = _torchrun(
        _pretrain_cmd(small_data, tmp_path / "two", "--budget", "10steps", "--family", family, *extra, *opt),
        {"ddp": "29517", "fsdp": "29518"}[sharding] if optimizer == "adamw" else "29521",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    tolerance = 1e-4 if optimizer == "adamw" else 2e-3
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=tolerance), step
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["world_size"] == 2
    m1, m2 = llmkit.load(tmp_path / "one"), llmkit.load(tmp_path / "two")  # the final weights, gathered whole under FSDP
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        # Muon: AdamW's near sign-sized steps on the norms amplify those roundings in the weights; the losses above agree
        assert optimizer == "muon" or torch.allclose(v1, v2, atol=1e-4), k
    row = next(r for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train")
    flops = llmkit.load(tmp_path / "two").config.flops_per_token(32)["train"]
    assert row["mfu"] == pytest.approx(
        flops * row["tokens_per_s"] / (config["peak_flops_per_process"] * 2), rel=1e-6
    )  # both processes' peak


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_stops_every_rank_together_on_a_time_budget(small_data, tmp_path, sharding):
    """A time budget stops all ranks at the same step (one clock, any rank's stop), and under FSDP an evaluation of 17
    windows on 2 ranks with batches of 8 (2 forward calls on one rank, 1 on the other) makes the same calls everywhere."""
    extra = ["--fsdp"] if sharding == "fsdp" else []
    args = _pretrain_cmd(
        small_data,
        tmp_path / "run",
        "--budget",
        "6s",
        "--max-epochs",
        "0",
        "--eval-every",
        "7",
        "--eval-windows",
        "17",
        "--batch-size",
        "8",
        "--dropout",
        "0.1",
        *extra,
    )
    proc = _torchrun(args, "29519" if sharding == "ddp" else "29520")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped: time budget of 6s reached" in proc.stderr or "stopped: budget reached on another rank" in proc.stderr
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" for r in rows) and (tmp_path / "run" / "model.safetensors").exists()
    from llmkit.train.checkpoint import find_checkpoint, load_checkpoint

    rng = load_checkpoint(find_checkpoint(tmp_path / "run"))[2]["rng"]  # each rank's generator, saved for an exact resume
    assert not torch.equal(rng["rng.torch.0"], rng["rng.torch.1"])  # and each rank draws its own dropout masks


@pytest.mark.slow
def test_pretrain_cli_writes_a_complete_run_folder_and_eval_perplexity_reads_it(small_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*_pretrain_cmd(small_data, out, "--budget", "20steps"))
    assert "stopped: budget of 20 steps reached" in proc.stderr
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "report.md",
        "samples.md",
        "train_config.json",
        "checkpoint/state.json",
    ):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"tokens_per_s", "mfu", "lr", "loss"} <= set(rows[0]) and any(r["split"] == "val" and "bpb" in r for r in rows)
    result = json.loads(
        run_cli(
            "eval", "perplexity", "--model", str(out), "--file", "shakespeare:macbeth", "--window", "32", "--max-tokens", "2000", "--json"
        ).stdout
    )
    assert result["tokens"] == sum(k for *_, k in window_plan(2000, 32)) == 1937
    assert 1 < result["perplexity"] < 512 and result["bits_per_byte"] > 0


@pytest.mark.slow
def test_eval_perplexity_of_smollm2_equals_transformers_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    from llmkit.embedded import embedded_path

    text = tmp_path / "t.txt"
    text.write_text(
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
        "of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them."
    )
    result = json.loads(run_cli("eval", "perplexity", "--model", "smollm2", "--file", str(text), "--window", "512", "--json").stdout)
    path = embedded_path("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([llmkit.load("smollm2").tokenizer.encode(text.read_text())])
    with torch.no_grad():
        loss = ref(ids, labels=ids).loss.item()
    assert result["tokens"] == ids.shape[1] - 1
    assert result["nats_per_token"] == pytest.approx(loss, abs=1e-3)


def test_every_target_token_weighs_the_same_across_micro_batches(small_data, tmp_path):
    """Masked-LM rows score different numbers of tokens: batch 8 in one step and 4 + 4 accumulated give the same gradient."""
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.pretrain import Objective, build
    from llmkit.train.runtime import Dist, accumulate_gradients

    cfg = _cfg(small_data, tmp_path, family="encoder")
    tok = Tokenizer.load(small_data)
    torch.manual_seed(0)
    model = build(cfg, tok.vocab_size)
    objective = Objective(cfg, tok, 0)
    rows = torch.randint(10, tok.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    whole = objective.prepare(rows, [(0, 0, i) for i in range(8)])
    halves = [whole.rows(slice(0, 4)), whole.rows(slice(4, 8))]
    counts = [h.n_targets for h in halves]
    assert counts[0] != counts[1]  # the case that a mean per micro-batch gets wrong

    def grads(micro):
        model.zero_grad()
        accumulate_gradients(model, micro, lambda p: objective.loss_sum(model, p)[0], [p.n_targets for p in micro], Dist(), None)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one, two = grads([whole]), grads(halves)
    assert torch.allclose(one, two, atol=1e-6, rtol=1e-4)
    model.zero_grad()
    for h in halves:  # the old way: the mean loss of each micro-batch, halved
        (objective.loss_sum(model, h)[0] / h.n_targets / 2).backward()
    mean_of_means = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(one, mean_of_means, atol=1e-6, rtol=1e-4)


def test_the_learning_rate_is_continuous_at_the_end_of_warmup():
    cfg = PretrainConfig(lr=3e-3, warmup=50, min_lr_ratio=0.1, schedule="cosine")
    rates = [learning_rate(cfg, s, s / 200, 50 / 200) for s in range(201)]
    assert rates[49] == pytest.approx(3e-3) and rates[50] == pytest.approx(3e-3)  # the cosine starts at its top
    assert max(abs(a - b) for a, b in zip(rates[49:], rates[50:])) < 0.001 * 3e-3 * 10  # no step bigger than the slope
    assert rates[200] == pytest.approx(3e-4) and all(a >= b for a, b in zip(rates[50:], rates[51:]))


def test_the_tokenizer_learns_only_from_training_documents(tmp_path, monkeypatch):
    """Empty and duplicate documents must not shift the split between tokenizer training and the shards."""
    import llmkit.tokenizer as tokmod
    import llmkit.train.pretrain as pretrain_module
    from llmkit.data.loader import open_shard
    from llmkit.train.pretrain import prepare_data
    from llmkit.train.runtime import Dist

    docs = tmp_path / "docs"
    docs.mkdir()
    plays = [d.text for d in llmkit.data.sources.shakespeare("macbeth")][0].split("\n\n")
    for i in range(40):
        text = "" if i % 7 == 3 else (plays[5] if i % 5 == 1 else f"Document {i}: " + " ".join(plays[i * 3 : i * 3 + 3]))
        (docs / f"{i:02d}.txt").write_text(text)
    seen = {}
    real = tokmod.train_tokenizer
    monkeypatch.setattr(
        pretrain_module, "train_tokenizer", lambda texts, *a, **k: seen.setdefault("texts", list(texts)) and real(texts, *a, **k)
    )
    cfg = PretrainConfig(data=str(docs), tokenizer_kind="byte-bpe", vocab_size=600, out=str(tmp_path / "run"))  # decodes byte for byte
    data = prepare_data(cfg, Dist(), lambda m: None)
    tok = tokmod.Tokenizer.load(data)
    val_docs = [t for t in tok.decode(open_shard(data, "val").tolist()).split(tok.special["eos"]) if t.strip()]
    train_docs = [t for t in tok.decode(open_shard(data, "train").tolist()).split(tok.special["eos"]) if t.strip()]
    assert val_docs and set(val_docs).isdisjoint(seen["texts"]) and set(train_docs) == set(seen["texts"])
    # the run folder remembers what it was prepared from: other options prepare it again
    meta = json.loads((data / "meta.json").read_text())
    prepare_data(
        PretrainConfig(data=str(docs), tokenizer_kind="byte-bpe", vocab_size=500, out=str(tmp_path / "run")), Dist(), lambda m: None
    )
    assert json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"] == 500 != meta["tokenizer"]["vocab_size"]


def test_a_sample_leaves_out_the_sentinels_of_a_tokenizer_that_has_them(small_data, monkeypatch):
    """`llmkit tokenizer train` gives every kind T5's sentinels; a decoder pretrained on it samples them early on, and a
    sample shows the text around them only."""
    from llmkit.generate import Generation
    from llmkit.tokenizer import Tokenizer
    from llmkit.train import pretrain as pretrain_module

    tok = Tokenizer.load(small_data)
    assert tok.sentinel_ids
    word = tok.encode(" crown")
    new = [tok.sentinel_ids[69], *word]
    monkeypatch.setattr(pretrain_module, "generate", lambda *a, **k: [Generation(prompt_ids=[], ids=new, text="", finish_reason="length")])
    model = pretrain_module.build(_cfg(small_data, "unused"), tok.vocab_size)
    text = pretrain_module.sample_text(model, tok, small_data, _cfg(small_data, "unused"))
    assert "<extra_id_" not in text and text.endswith(" crown") and len(text) > len(" crown")


def test_a_second_run_on_the_same_text_and_options_reuses_the_prepared_shards(tmp_path, monkeypatch):
    """The tokenizer is trained once per text and options: the next run copies the cached shards (the same bytes); other
    text or another vocabulary prepares afresh; LLMKIT_CACHE=off keeps nothing."""
    from llmkit.tokenizer import Tokenizer
    from llmkit.train import pretrain as pretrain_module
    from llmkit.train.runtime import Dist

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    text = [d.text for d in llmkit.data.sources.shakespeare("macbeth")][0]
    for i in range(6):
        (docs / f"{i}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    trained = []
    real = pretrain_module.train_tokenizer
    monkeypatch.setattr(pretrain_module, "train_tokenizer", lambda *a, **k: trained.append(1) or real(*a, **k))

    def prepare(out: str, **kw) -> Path:
        cfg = PretrainConfig(data=str(docs), vocab_size=kw.pop("vocab_size", 400), out=str(tmp_path / out), **kw)
        return pretrain_module.prepare_data(cfg, Dist(), lambda m: None)

    first, second = prepare("a"), prepare("b")
    assert len(trained) == 1 and list((tmp_path / "cache" / "prepared").iterdir())
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert Tokenizer.load(second).encode("Fair is foul") == Tokenizer.load(first).encode("Fair is foul")
    prepare("c", vocab_size=500)
    (docs / "0.txt").write_text(text[:4000])
    prepare("d")
    assert len(trained) == 3
    monkeypatch.setenv("LLMKIT_CACHE", "off")
    prepare("e")
    assert len(trained) == 4


def test_pretraining_tokenizers_spell_every_byte_and_only_t5s_have_sentinels(tmp_path):
    """The default tokenizer (a unigram with byte fallback) never maps a held-out character to <unk>, and validation
    bits per byte divide by the bytes the scored tokens stand for, exactly; T5's span corruption gets its 100
    sentinels, decoders and encoders none (dead rows in the head)."""
    from llmkit.data.loader import open_shard
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.pretrain import Objective, build, eval_starts, evaluate, prepare_data
    from llmkit.train.runtime import Dist

    docs = tmp_path / "docs"
    docs.mkdir()
    text = [d.text for d in llmkit.data.sources.shakespeare("macbeth")][0]
    for i in range(10):
        (docs / f"{i}.txt").write_text(text[i * 6000 : (i + 1) * 6000])
    tokenizers = {
        family: Tokenizer.load(
            prepare_data(PretrainConfig(family=family, data=str(docs), vocab_size=700, out=str(tmp_path / family)), Dist(), print)
        )
        for family in ("decoder", "encoder", "encoder-decoder")
    }
    odd = "Exeunt — naïve 😀 $5 *"
    data = tmp_path / "decoder" / "data"
    cfg = PretrainConfig(data=str(data), d_model=32, n_layers=1, n_heads=2, block_size=32, batch_size=4, eval_windows=6)
    model = build(cfg, 700)
    val = evaluate(model, Objective(cfg, tokenizers["decoder"], 0), cfg, data, Dist(), None)
    shard = np.asarray(open_shard(data, "val"))
    starts = eval_starts(len(shard), 33, 6)
    assert starts[1] > 33  # spread over the shard
    targets = torch.from_numpy(np.stack([shard[s : s + 33] for s in starts]).astype(np.int64))[:, 1:]
    exact = sum(tokenizers["decoder"].token_bytes[int(i)] for i in targets.flatten())  # the scored tokens' own bytes
    assert val["bpb"] == pytest.approx(val["loss"] / math.log(2) * targets.numel() / exact, rel=1e-6)
    grad_modes: list[bool] = []
    objective = Objective(cfg, tokenizers["decoder"], 0)
    score = objective.loss_sum
    objective.loss_sum = lambda *a, **k: (grad_modes.append(torch.is_grad_enabled()), score(*a, **k))[1]
    evaluate(model, objective, cfg, data, Dist(), None)
    assert grad_modes and not any(grad_modes)  # validation builds no autograd graph
    for family, tok in tokenizers.items():
        assert tok.kind == PretrainConfig().tokenizer_kind == "unigram" and tok.vocab_size == 700
        ids = tok.encode(odd)
        assert tok.unk_id not in ids and tok.decode(ids) == odd, family
        assert len(tok.sentinel_ids) == (100 if family == "encoder-decoder" else 0), family


def test_a_validation_shard_shorter_than_a_window_is_scored_or_refused(tmp_path):
    from llmkit.data.prepare import prepare
    from llmkit.data.sources import read_source
    from llmkit.tokenizer import train_tokenizer

    (tmp_path / "c").mkdir()
    for i in range(10):
        (tmp_path / "c" / f"{i}.txt").write_text((f"Long training text {i} about kings and crowns. " * 40) if i else "A short one.")
    tok = train_tokenizer(read_source(str(tmp_path / "c")).texts, "byte-bpe", 600)
    for seed in range(100):  # the seed that holds out the short document
        meta = prepare(str(tmp_path / "c"), tok, str(tmp_path / "d"), val_fraction=0.1, seed=seed, log=lambda m: None)
        if meta["val_tokens"] < 33:
            break
    assert 2 <= meta["val_tokens"] < 33
    summary = pretrain(
        PretrainConfig(
            data=str(tmp_path / "d"),
            d_model=32,
            n_layers=1,
            n_heads=2,
            block_size=32,
            batch_size=4,
            budget="3steps",
            eval_every=3,
            precision="fp32",
            out=str(tmp_path / "run"),
            samples=False,
        ),
        log=lambda m: None,
    )
    assert summary["val_loss"] > 1.0 and summary["val_bpb"] > 0.1  # scored, not 0 nats
    prepare(str(tmp_path / "c"), tok, str(tmp_path / "none"), val_fraction=0.0, log=lambda m: None)
    with pytest.raises(LlmkitError, match="validation shard .* has 0 tokens"):
        pretrain(PretrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "run2"), budget="1steps"), log=lambda m: None)


def test_float16_trains_with_loss_scaling(small_data, tmp_path):
    pretrain(_cfg(small_data, tmp_path, precision="fp16", budget="30steps", eval_every=30), log=lambda m: None)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert all("loss_scale" in r for r in rows) and rows[0]["loss_scale"] > 1
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 0.3
    assert all(torch.isfinite(v).all() for v in llmkit.load(tmp_path).state_dict().values())


def test_a_resumed_run_reports_its_own_throughput(small_data, tmp_path):
    with pytest.raises(_Crash):
        _Killed(_cfg(small_data, tmp_path, budget="12steps", save_every=6), 7, log=lambda m: None).run()
    summary = pretrain(_cfg(small_data, tmp_path, budget="12steps", save_every=6, resume=True), log=lambda m: None)
    assert summary["session_tokens"] == 6 * 8 * 32 and summary["tokens"] == 12 * 8 * 32
    assert summary["tokens_per_s"] == pytest.approx(summary["session_tokens"] / summary["session_seconds"], rel=1e-6)


# --- the speedrun recipe (issue 15) ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder-decoder"])
def test_each_model_option_changes_what_it_should_in_every_family(family):
    from llmkit.model import build_model
    from llmkit.model.config import ModelConfig

    base = dict(family=family, vocab_size=61, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, position="rope", bias=False)
    plain = ModelConfig(**base)
    modern = ModelConfig(**base, qk_norm=True, activation="relu2", logit_softcap=3.0, zero_init=True, tie_embeddings=False)
    torch.manual_seed(0)
    a, b = build_model(plain), build_model(modern)
    n_attn = sum(1 for m in b.modules() if type(m).__name__ == "Attention")
    # QK-norm: one gain per head channel for queries and one for keys, in every attention (self and cross)
    extra = sum(p.numel() for n, p in b.named_parameters() if ".q_norm." in n or ".k_norm." in n)
    assert extra == n_attn * 2 * 16
    # untied head: its own matrix (the decoder and encoder-decoder tie by default)
    embeddings = {p.data_ptr() for m in b.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert b.lm_head.weight.data_ptr() not in embeddings
    # zero-init: every attention and feed-forward output projection starts at zero, nothing else
    zero = {n for n, p in b.named_parameters() if p.dim() == 2 and not p.abs().sum()}
    assert zero and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in zero)
    assert len(zero) == sum(1 for n, _ in b.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight")))
    ids = torch.randint(0, 61, (2, 8))
    args = (ids, ids) if family == "encoder-decoder" else (ids,)
    out_b = b(*args)
    assert out_b.abs().max() < 3.0  # soft-capped logits stay inside (-cap, cap)
    out_b.float().sum().backward()  # every option trains
    with torch.no_grad():
        b.lm_head.weight.mul_(1000)
    assert b(*args).abs().max() < 3.0 + 1e-5  # still inside the cap
    with torch.no_grad():
        a.lm_head.weight.mul_(1000)
    assert a(*args).abs().max() > 30  # without the cap the logits grow with the head
    # ReLU²: the feed-forward activation squares the rectified input
    x = torch.linspace(-2, 2, 9)
    mlp = next(m for m in b.modules() if type(m).__name__ == "MLP")
    assert torch.equal(mlp.act(x), torch.relu(x) ** 2)


def _newton_schulz(g: torch.Tensor, steps: int = 5, dtype=torch.bfloat16) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz orthogonalization, written out (the reference for torch.optim.Muon, which
    computes it in bf16; llmkit's Muon on a CPU in float32)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)  # spectral norm at most 1
    for _ in range(steps):  # x <- a x + (b G + c G²) x with G = x xᵀ
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def test_muon_updates_matrices_by_newton_schulz_and_the_rest_by_adamw():
    from llmkit.model import build_model
    from llmkit.model.config import preset
    from llmkit.train.optim import make_optimizer, muon_parameters

    torch.manual_seed(0)
    model = build_model(preset("cpu-modern", vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    cfg = PretrainConfig(muon_lr=0.02, muon_momentum=0.95)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    in_muon = {id(p) for p in muon_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in in_muon}
    linears = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == {f"blocks.0.{m}.weight" for m in linears}
    assert {type(o).__name__ for o in opt.optimizers} == {"Muon", "AdamW"}
    w = model.blocks[0].mlp.up_proj.weight  # (128, 32): a tall matrix
    e = model.embed.tokens.weight
    before, e_before = w.detach().clone(), e.detach().clone()
    g, ge = torch.randn_like(w), torch.randn_like(e)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad, e.grad = g.clone(), ge.clone()
    for group in opt.param_groups:
        group["lr"] = group["base_lr"]
    opt.step()
    # Nesterov momentum from a zero buffer: buf = (1 - m) g, update = g + m (buf - g); lr scaled by sqrt(max(1, rows/cols))
    m = 0.95
    update = g.lerp(torch.zeros_like(g).lerp_(g, 1 - m), m)  # = g + m (buf - g), rounded as torch's lerp rounds it
    expected = before - 0.02 * math.sqrt(max(1, w.shape[0] / w.shape[1])) * _newton_schulz(update, dtype=torch.float32)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)
    # AdamW's first step (bias-corrected moments): decay, then lr x g / (|g| + eps), about lr x sign(g)
    expected_e = e_before * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * ge / (ge.abs() + 1e-8)
    torch.testing.assert_close(e.detach(), expected_e, rtol=0, atol=1e-6)


def test_llmkits_muon_is_torchs_with_the_newton_schulz_in_float32(monkeypatch):
    """ns_dtype=bf16 is torch.optim.Muon's step bit for bit; float32 (the CPU default) is torch's step with its
    Newton–Schulz run in float32, bit for bit (momentum, Nesterov, lr adjustment, weight decay all torch's), and that
    Newton–Schulz is the written-out reference's, orthogonalizing as well (singular values in torch's band)."""
    import torch.optim._muon as torch_muon

    from llmkit.model import build_model
    from llmkit.model.config import preset
    from llmkit.train.optim import Muon, make_optimizer, newton_schulz

    torch.manual_seed(0)
    weights = [torch.randn(96, 32), torch.randn(32, 32), torch.randn(32, 96)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params], opt

    kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    torch_bf16, _ = run(lambda ps: torch.optim.Muon(ps, **kw))
    bf16, _ = run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw))
    fp32, opt = run(lambda ps: Muon(ps, ns_dtype=torch.float32, **kw))
    with monkeypatch.context() as m:
        m.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, coef, steps, eps: newton_schulz(g, coef, steps, eps, torch.float32))
        torch_fp32, _ = run(lambda ps: torch.optim.Muon(ps, **kw))
    for a, b, c, d in zip(torch_bf16, bf16, torch_fp32, fp32):
        assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, d)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}  # torch's state layout: checkpoints resume either way
    g = torch.randn(32, 96)
    ours = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    assert torch.equal(ours, _newton_schulz(g, dtype=torch.float32))
    s = torch.linalg.svdvals(ours)
    assert 0.6 < s.min() and s.max() < 1.3
    model = build_model(preset("cpu-modern", vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        muon = make_optimizer(model, PretrainConfig(muon_precision=precision), torch.device("cpu")).optimizers[0]
        assert isinstance(muon, torch.optim.Muon) and muon.ns_dtype == dtype
    groups = make_optimizer(model, PretrainConfig(muon_weight_decay=0.05), torch.device("cpu")).optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05]  # --muon-weight-decay reaches torch's decoupled decay
    # --embedding-lr: the input embeddings in a group of their own (not a tied head's); without it the two groups of old
    groups = make_optimizer(model, PretrainConfig(embedding_lr=0.05), torch.device("cpu")).optimizers[1].param_groups
    assert [(g["lr"], g["base_lr"]) for g in groups] == [(3e-3, 3e-3), (3e-3, 3e-3), (0.05, 0.05)]
    assert groups[2]["params"] == [model.embed.tokens.weight] and groups[2]["weight_decay"] == 0.1
    assert len(make_optimizer(model, PretrainConfig(), torch.device("cpu")).optimizers[1].param_groups) == 2
    gpt = build_model(preset("cpu-gpt", vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=False))
    groups = make_optimizer(gpt, PretrainConfig(embedding_lr=0.05), torch.device("cpu")).optimizers[1].param_groups
    assert groups[2]["params"] == [gpt.embed.tokens.weight, gpt.embed.position.weight]  # learned positions too
    tied = build_model(preset("cpu-modern", vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True))
    with pytest.raises(LlmkitError, match="tied"):
        make_optimizer(tied, PretrainConfig(embedding_lr=0.05), torch.device("cpu"))


def test_the_wsd_schedule_holds_the_peak_then_decays_linearly():
    from llmkit.train.runtime import lr_scale

    cfg = PretrainConfig(warmup=10, schedule="wsd", cooldown=0.4, min_lr_ratio=0.0)
    assert lr_scale(cfg, 0, 0.0) == pytest.approx(0.1) and lr_scale(cfg, 9, 0.05) == pytest.approx(1.0)
    assert lr_scale(cfg, 50, 0.3) == 1.0 and lr_scale(cfg, 50, 0.6) == pytest.approx(1.0)
    assert lr_scale(cfg, 90, 0.8) == pytest.approx(0.5) and lr_scale(cfg, 100, 1.0) == pytest.approx(0.0)
    cosine = PretrainConfig(warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_scale(cosine, 50, 0.5, 0.0) == pytest.approx(0.55)


def test_model_options_on_the_command_line():
    from llmkit.cli.pretrain import parse_model_options

    assert parse_model_options(["qk_norm=false", "logit_softcap=none", "activation=gelu", "d-ff=512"]) == {
        "qk_norm": False,
        "logit_softcap": None,
        "activation": "gelu",
        "d_ff": 512,
    }
    with pytest.raises(LlmkitError, match="not KEY=VALUE"):
        parse_model_options(["qk_nrom=true"])
    with pytest.raises(LlmkitError, match="--block-size"):
        parse_model_options(["max_seq_len=64"])


def test_the_default_recipe_trains_with_muon_and_its_loss_falls(small_data, tmp_path):
    """The defaults (cpu-modern, Muon + AdamW, warmup-stable-decay) at a tiny size: the loss falls, Muon's momentum
    buffers are in the checkpoint, and a new --lr / --muon-lr on resume is the one used (not the checkpoint's)."""
    pretrain(_cfg(small_data, tmp_path / "new", budget="60steps", eval_every=30), log=lambda m: None)
    losses = _train_losses(tmp_path / "new")
    assert np.mean([losses[s] for s in range(56, 61)]) < np.mean([losses[s] for s in range(1, 6)]) - 1.0
    config = json.loads((tmp_path / "new" / "train_config.json").read_text())
    assert config["optimizer"] == "muon" and config["schedule"] == "wsd" and config["preset"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new" / "checkpoint" / "optimizer.safetensors"), "pt") as f:
        assert any(k.endswith("::momentum_buffer") for k in f.keys()) and any(k.endswith("::exp_avg") for k in f.keys())
    pretrain(_cfg(small_data, tmp_path / "new", budget="64steps", eval_every=30, resume=True), log=lambda m: None)
    assert sorted(_train_losses(tmp_path / "new"))[-4:] == [61, 62, 63, 64]


def test_the_optimizers_state_round_trips_and_keeps_this_runs_peaks():
    from llmkit.model import build_model
    from llmkit.model.config import preset
    from llmkit.train.optim import make_optimizer

    torch.manual_seed(0)
    model = build_model(preset("cpu-modern", vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    first = make_optimizer(model, PretrainConfig(lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    first.step()
    saved = first.state_dict()
    assert sorted(saved["state"]) == list(range(sum(1 for p in model.parameters())))  # one numbering across both
    second = make_optimizer(model, PretrainConfig(lr=5e-4, muon_lr=0.01, weight_decay=0.2, muon_weight_decay=0.05), torch.device("cpu"))
    second.load_state_dict(saved)
    assert sorted(g["weight_decay"] for g in second.param_groups) == [0.0, 0.05, 0.2]  # and its new decays
    for a, b in zip(first.optimizers, second.optimizers):
        for p in a.state:
            for key, value in a.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.state[p][key])), key
    assert sorted(g["base_lr"] for g in second.param_groups) == [5e-4, 5e-4, 0.01]  # a resumed run's new --lr / --muon-lr


def test_a_finished_run_says_so_on_resume_and_a_larger_budget_extends_it(small_data, tmp_path):
    """`--resume` without `--budget` keeps the run's own budget: a finished run is refused with the reason (never
    trained on under a default budget without a word); a larger budget extends it, and says so."""
    out = tmp_path / "run"
    first = pretrain(_cfg(small_data, out, budget="6steps", eval_every=100, samples=True), log=lambda m: None)
    assert first["steps"] == 6 and "## step 6" in (out / "samples.md").read_text()  # no evaluation ran: the final sample
    with pytest.raises(LlmkitError, match=r"is finished \(budget of 6 steps reached, 6 steps\)"):
        pretrain(_cfg(small_data, out, budget=None, eval_every=3, resume=True), log=lambda m: None)
    said: list[str] = []
    more = pretrain(_cfg(small_data, out, budget="9steps", eval_every=3, resume=True), log=said.append)
    assert more["steps"] == 9 and any("extending the finished run" in m and "6steps -> 9steps" in m for m in said)
    assert json.loads((out / "train_config.json").read_text())["budget"] == "9steps"
