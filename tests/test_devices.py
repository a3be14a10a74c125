"""Devices and memory (issue 28): --device everywhere and refused in one line where it is not there; every tensor a
command creates follows the model's device (checked on a CPU: a stray default-device tensor lands on `meta` and
fails); QLoRA's 4-bit base trains LoRA as the float base does, and its adapter loads on the float model; activation
checkpointing gives the same gradients; `llmkit model memory` predicts by part and says what would fit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmkit.errors import LlmkitError

from conftest import run_cli, small_finetune, tiny_model


def test_devices_resolve_and_refuse_what_is_not_there(monkeypatch):
    from llmkit import devices

    assert devices.resolve("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu") and devices.resolve(None) == torch.device("cpu")
    for spec, words in (("cuda", "use --device cpu"), ("cuda:3", "use --device cpu"), ("mps", "no Apple GPU"), ("tpu", "not a device")):
        with pytest.raises(LlmkitError) as e:
            devices.resolve(spec)
        assert words in str(e.value.message) + str(e.value.fix)
    # a machine with one GPU: cuda:3 names the GPUs there are
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve("auto") == torch.device("cuda", 0)
    with pytest.raises(LlmkitError, match="1 CUDA GPU"):
        devices.resolve("cuda:3")
    assert devices.default_dtype(torch.device("cpu")) == torch.float32


def test_every_command_takes_device_and_a_missing_one_is_one_line(tmp_path):
    for cmd in (
        ["generate", "--prompt", "hi"],
        ["chat"],
        ["serve"],
        ["finetune"],
        ["eval", "perplexity", "--file", "x"],
        ["eval", "tasks", "--tasks", "arithmetic"],
        ["embed", "text", "a"],
        ["model", "memory", "smollm2"],
    ):
        proc = run_cli(*cmd, "--device", "cuda:7" if torch.cuda.is_available() else "cuda", check=False, cwd=tmp_path, timeout=300)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (cmd, proc.stderr)
        assert "--device cuda" in proc.stderr and "fix:" in proc.stderr, (cmd, proc.stderr)


def _on_meta_by_default():
    """Tensors made without a device land on `meta` (and fail when they meet the model's CPU tensors)."""
    return torch.device("meta")


def test_decoding_evaluation_and_embedding_create_every_tensor_on_the_models_device(tokenizers_by_kind):
    from llmkit.embed.contextual import embed_texts
    from llmkit.evaluate.harness import LlmkitLM
    from llmkit.evaluate.perplexity import score_tokens
    from llmkit.generate import GenerationConfig, generate

    tok = tokenizers_by_kind["byte-bpe"]
    model = tiny_model("tiny-llama", tok.vocab_size, tokenizer=tok, max_seq_len=128).to("cpu")
    model.name_or_path = "tiny"
    encoder = tiny_model("tiny-bert", tok.vocab_size, tokenizer=tok, max_seq_len=128).to("cpu")
    lm = LlmkitLM(model=model, batch_size=4)
    ids = tok.encode("To be, or not to be, that is the question")
    expected = generate(model, tok, ["To be"], GenerationConfig(max_new_tokens=6, do_sample=False))[0].ids
    expected_score = score_tokens(model, ids, 8, batch_size=2)
    with _on_meta_by_default():
        got = generate(model, tok, ["To be", "or not"], GenerationConfig(max_new_tokens=6, do_sample=False))
        sampled = generate(model, tok, ["To be"], GenerationConfig(max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9, seed=1))
        nats, count = score_tokens(model, ids, 8, batch_size=2)
        scores = lm._loglikelihood_tokens([(("", ""), ids[:4], ids[4:7]), (("", ""), ids[:5], ids[5:6])])
        vectors = embed_texts(encoder, ["a sentence", "another one here"], pooling="mean")
    assert got[0].ids == expected and len(sampled[0].ids) == 4
    assert (nats, count) == pytest.approx(expected_score) and len(scores) == 2
    assert vectors.shape == (2, 64)


def test_fine_tuning_creates_every_tensor_on_the_models_device(tiny_base, tmp_path):
    """The recipe after loading (LoRA's new weights, batches, the loss, evaluation's decoding) under a meta default
    device, for plain, packed and QLoRA runs."""
    from llmkit.finetune.recipe import Finetuning

    class OnMeta(Finetuning):
        def prepare_model(self):
            self._meta = torch.device("meta")
            self._meta.__enter__()
            super().prepare_model()

        def predict(self):
            self._meta.__exit__(None, None, None)
            super().predict()

    for extra in ({}, {"pack": True}, {"method": "qlora"}, {"checkpointing": True}):
        out = tmp_path / f"run{len(extra)}{list(extra)}"
        cfg = small_finetune(tiny_base, out, n_train=32, batch_size=4, max_new_tokens=3, forgetting_tasks="sort", n_forgetting=2)
        cfg = dataclasses.replace(cfg, device="cpu", precision="auto", **extra)
        result = OnMeta(cfg, log=lambda m: None).run()
        assert result["steps"] == 2


def test_checkpointing_gives_the_same_gradients():
    from llmkit.model.lora import apply_method

    model = tiny_model("tiny-llama", 101, max_seq_len=64)
    apply_method(model, "lora")
    model.train()
    x = torch.randint(0, 101, (2, 16))
    grads = []
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        model(x).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_qlora_trains_through_the_4bit_base_and_its_adapter_loads_on_the_float_model(tiny_base, tmp_path):
    from llmkit.finetune.recipe import finetune
    from llmkit.model.lora import LoRALinear
    from llmkit.model.quantize import Int4Linear, quantize_frozen
    from llmkit.model.weights import load

    # the 4-bit layer's gradient to its input is grad_y times its dequantized weights
    base = torch.nn.Linear(64, 32)
    layer = Int4Linear(base)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).float().sum().backward()
    expected = torch.ones(3, 32) @ layer.dequantized().to(torch.bfloat16).float()
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)

    common = dict(n_val=8, budget="25steps", warmup=10)
    lora = finetune(small_finetune(tiny_base, tmp_path / "lora", **common), log=lambda m: None)
    qlora = finetune(small_finetune(tiny_base, tmp_path / "qlora", method="qlora", **common), log=lambda m: None)
    assert qlora["after"]["answer_loss"] < qlora["before"]["answer_loss"] - 0.3
    assert abs(qlora["after"]["answer_loss"] - lora["after"]["answer_loss"]) < 0.25  # 4 bits cost little
    assert "4-bit base" in qlora["saved"]
    merged = load(tmp_path / "qlora")  # the adapter on the float base: PEFT's layout
    assert not any(isinstance(m, (Int4Linear, LoRALinear)) for m in merged.modules())
    plain = load(tiny_base)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))
    quantize_frozen(plain, "int4")
    assert sum(isinstance(m, Int4Linear) for m in plain.modules()) == 2 * 7  # every projection of both blocks


def test_model_memory_predicts_by_part_and_says_what_would_fit():
    from llmkit.model.config import preset
    from llmkit.model.memory import Plan, predict

    cfg = preset("tiny-llama", vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=256)
    cpu = torch.device("cpu")
    lora = predict(cfg, Plan("lora", batch_size=8, max_len=128, autocast=torch.bfloat16), cpu, runtime=0)
    full = predict(cfg, Plan("full", batch_size=8, max_len=128, autocast=torch.bfloat16), cpu, runtime=0)
    ck = predict(cfg, Plan("lora", batch_size=8, max_len=128, autocast=torch.bfloat16, checkpointing=True), cpu, runtime=0)
    qlora = predict(cfg, Plan("qlora", batch_size=8, max_len=128, autocast=torch.bfloat16), cpu, runtime=0)
    n = cfg.param_count()
    assert full.parts["weights"] == 4 * n and full.parts["gradients"] == 4 * n and full.parts["optimizer"] == 8 * n
    assert lora.parts["gradients"] < 4 * n / 10 and ck.parts["activations"] < lora.parts["activations"] / 2
    assert qlora.parts["weights"] < lora.parts["weights"] / 2
    twice = predict(cfg, Plan("lora", batch_size=16, max_len=128, autocast=torch.bfloat16), cpu, runtime=0)
    assert 1.6 < twice.parts["activations"] / lora.parts["activations"] < 2.05  # rows grow it, the weights' casts do not
    # the measured bytes autograd keeps: a forward pass under the same hooks, counted directly
    from llmkit.model.memory import _saved_bytes

    direct = _saved_bytes(cfg, cfg.n_layers, Plan("lora", batch_size=8, max_len=128, autocast=torch.bfloat16), rows=8)
    assert lora.parts["activations"] - 8 * 128 * 512 * 6 == pytest.approx(direct, rel=0.02)

    proc = run_cli("model", "memory", "smollm2", "--method", "lora", "--batch-size", "8", "--max-len", "64", "--json", timeout=300)
    out = json.loads(proc.stdout)
    assert set(out) == {"total_bytes", "parts", "device", "free_bytes", "fits", "suggestions"}
    assert set(out["parts"]) == {"weights", "gradients", "optimizer", "activations", "kv_cache", "runtime"}
    assert out["total_bytes"] == sum(out["parts"].values()) and out["fits"] is True
    big = run_cli("model", "memory", "llama", "--method", "full", "--batch-size", "64", "--max-len", "2048", "--json", timeout=300)
    verdict = json.loads(big.stdout)
    assert verdict["fits"] is False and verdict["suggestions"]
    bad = run_cli("model", "memory", "no-such-model", check=False, timeout=120)
    assert bad.returncode != 0 and "no model at" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tokenizers_by_kind):
    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["wordpiece"]
    out = tmp_path_factory.mktemp("encoder")
    save_model(tiny_model("tiny-bert", tok.vocab_size, d_model=64, max_seq_len=128), out, tokenizer=tok)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, sharding, kind", [("lora", "ddp", "decoder"), ("full", "fsdp", "decoder"), ("full", "fsdp", "classifier")]
)
def test_torchrun_fine_tuning_follows_the_single_process_loss_curve(tiny_base, tiny_encoder, tmp_path, method, sharding, kind):
    """2 ranks x 4 rows = 1 process x 8 rows, loss for loss: LoRA through DDP, full fine-tuning through FSDP2 (a
    decoder, and an encoder's classifier), with pretraining's runtime (every answer token of every rank weighs the same;
    one clock). LoRA's dropout draws other masks on other ranks, so it is off here."""
    import subprocess
    import sys

    if kind == "classifier":
        common = ["--model", str(tiny_encoder), "--task", "genre", "--n-train", "64", "--n-val", "16"]
    else:
        common = ["--model", str(tiny_base), "--task", "reverse", "--n-train", "64", "--n-val", "4", "--max-new-tokens", "3"]
        common += ["--forgetting-tasks", "sort", "--n-forgetting", "2", "--general-text", "shakespeare:macbeth", "--general-tokens", "64"]
    common += ["--budget", "5steps", "--precision", "fp32", "--warmup", "1", "--method", method, "--device", "cpu"]
    common += ["--lr", "1e-2", "--lora-dropout", "0"] if method == "lora" else ["--lr", "1e-3"]
    run_cli("finetune", *common, "--batch-size", "8", "--out", str(tmp_path / "one"), timeout=600)
    port = {"lora": "29631", "full": "29632"}[method] if kind == "decoder" else "29633"
    extra = ["--fsdp"] if sharding == "fsdp" else []
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "llmkit", "finetune"]
        + common
        + extra
        + ["--batch-size", "4", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {k: [json.loads(r) for r in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("one", "two")}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [1, 2, 3, 4, 5]
    for a, b in zip(rows["one"], rows["two"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and a["tokens"] == b["tokens"]
    one, two = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("one", "two"))
    metric = "answer_loss" if kind == "decoder" else "macro_f1"
    assert two["after"][metric] == pytest.approx(one["after"][metric], abs=1e-3)
