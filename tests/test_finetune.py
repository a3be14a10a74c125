"""Fine-tuning: LoRA equal to peft, adapters loadable by peft, exact merge/unmerge, gradients only where they belong,
the loss mask on exactly the answer tokens, tasks that never leak, and a fine-tuning run that learns and resumes."""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit import io
from llmkit.data import tasks as T
from llmkit.errors import LlmkitError
from llmkit.finetune.data import IGNORE, encode_chat, prepare_examples, read_rows, to_example
from llmkit.model import build_model, preset
from llmkit.model.lora import apply_adapters, apply_lora, lora_layers, merge_lora, save_lora, trainable_share, unmerge_lora
from llmkit.model.weights import export_hf

from conftest import run_cli, small_finetune, tiny_model


def _tiny_llama():
    return tiny_model("tiny-llama", 101, n_kv_heads=2, d_ff=96, max_seq_len=64)


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_lora_equals_peft_and_our_adapter_loads_in_peft(tmp_path, rslora):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    model = _tiny_llama()
    export_hf(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rslora=rslora)
    _randomize_lora(model)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
    # the same A and B put into peft's own LoRA on the Hugging Face export give the same logits
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, use_rslora=rslora)
    ).eval()
    from llmkit.model.lora import _hf_name

    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            hf_name = _hf_name(model, name)
            params[f"base_model.model.{hf_name}.lora_A.default.weight"].copy_(layer.lora_A)
            params[f"base_model.model.{hf_name}.lora_B.default.weight"].copy_(layer.lora_B)
        assert (peft_model(ids).logits - ours).abs().max().item() <= 1e-5
    # our saved adapter loads in peft, on the export, to the same logits
    save_lora(model, tmp_path / "adapter")
    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (loaded(ids).logits - ours).abs().max().item() <= 1e-5


def test_merge_then_unmerge_restores_the_base_exactly_and_merged_equals_unmerged():
    model = _tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=16)
    _randomize_lora(model)
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        after = model(ids)
    assert (merged - before).abs().max().item() <= 1e-5 and torch.equal(after, before)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, base[name + ".weight"])


def test_only_adapter_parameters_receive_gradients():
    for method in ("lora", "adapter"):
        model = _tiny_llama().train()
        apply_lora(model, r=2, alpha=4) if method == "lora" else apply_adapters(model, bottleneck=8)
        model(torch.randint(0, 101, (2, 8))).sum().backward()
        for name, p in model.named_parameters():
            is_new = "lora_" in name or ".down." in name or ".up." in name
            assert (p.grad is not None) == is_new, name
        trainable, total = trainable_share(model)
        assert 0 < trainable < total * 0.2


def test_lora_targets_and_errors():
    model = _tiny_llama()
    names = apply_lora(model, r=2, alpha=4, target_modules="all-linear")
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    with pytest.raises(LlmkitError, match="no linear layer matches"):
        apply_lora(_tiny_llama(), target_modules=["nonexistent_proj"])
    with pytest.raises(LlmkitError, match="rank 0"):
        apply_lora(_tiny_llama(), r=0)


def test_the_loss_mask_covers_exactly_the_answer_tokens(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]
    ids, labels = encode_chat(tok, messages)
    assert ids == tok.encode(
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n5<|end|>\n"
        "<|user|>\nAnd 4 + 4?<|end|>\n<|assistant|>\n8<|end|>\n"
    )
    answer_spans = [i for i, y in enumerate(labels) if y != IGNORE]
    trained = tok.decode([ids[i] for i in answer_spans])
    assert trained == "5<|end|>\n8<|end|>\n"
    assert all(labels[i] == ids[i] for i in answer_spans)
    _, all_labels = encode_chat(tok, messages, train_on_prompt=True)
    assert all_labels == ids


@pytest.mark.slow
def test_the_loss_mask_on_smollm2_chat_template():
    tok = llmkit.load("smollm2").tokenizer
    ids, labels = encode_chat(tok, [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}])
    assert tok.decode([i for i, y in zip(ids, labels) if y != IGNORE]) == "Paris.<|im_end|>\n"
    assert tok.decode([i for i, y in zip(ids, labels) if y == IGNORE]).endswith("<|im_start|>assistant\n")


def test_rows_formats_and_length_limits(tmp_path, tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        + "\n"
        + json.dumps({"source": "word " * 300, "target": "long"})
        + "\n"
    )
    (tmp_path / "b.csv").write_text("text,label\nfair is foul,tragedies\nall's well,comedies\n")
    rows = [to_example(r) for r in read_rows(tmp_path / "a.jsonl")]
    assert rows[0].messages[0]["content"] == "Add\n\n2 and 3" and rows[1].answer == "hello" and rows[2].answer == "long"
    prep = prepare_examples(tok, rows, 64)
    assert len(prep.ids) == 2 and prep.dropped == 1
    prep = prepare_examples(tok, rows, 64, truncate=True)
    assert len(prep.ids) == 3 and prep.truncated == 1 and max(map(len, prep.ids)) == 64
    packed = prepare_examples(tok, rows[:2], 64, pack=True)
    assert len(packed.ids) == 1
    assert [to_example(r).label for r in read_rows(tmp_path / "b.csv")] == ["tragedies", "comedies"]
    with pytest.raises(LlmkitError, match="longer than 8 tokens"):
        prepare_examples(tok, rows, 8)
    with pytest.raises(LlmkitError, match="cannot tell the format"):
        to_example({"question": "?"})


def test_built_in_tasks_are_seeded_correct_and_never_leak():
    train = T.mixture("arithmetic:2,reverse:1,sort,dates", 200, "train", seed=0)
    val = T.mixture("arithmetic:2,reverse:1,sort,dates", 60, "val", seed=0)
    assert T.mixture("arithmetic:2,reverse:1,sort,dates", 200, "train", seed=0)[5].answer == train[5].answer
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in val}
    counts = {t: sum(e.task == t for e in train) for t in ("arithmetic", "reverse", "sort", "dates")}
    assert counts["arithmetic"] == 80 and counts["reverse"] == 40
    for e in train:
        q, a = e.messages[0]["content"], e.answer
        if e.task == "arithmetic":
            x, op, y = q.split("?")[0].split()[-3:]
            assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y))
        elif e.task == "sort":
            assert a.split() == sorted(q.split(": ")[1].split())
        elif e.task == "reverse":
            assert a.split() == q.split(": ")[1].split()[::-1]
    plays_train, plays_val = T.play_examples(50, "train", 0), T.play_examples(20, "val", 1)
    assert not {e.messages[0]["content"] for e in plays_train} & {e.messages[0]["content"] for e in plays_val}
    genre_train, genre_val = T.genre_examples("train"), T.genre_examples("val")
    assert not {e.text for e in genre_train} & {e.text for e in genre_val}
    assert {e.label for e in genre_val} == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}


@pytest.mark.slow
def test_finetune_a_small_gpt_learns_the_task_measures_forgetting_and_resumes(tmp_path, tokenizers_by_kind):
    from llmkit.finetune.recipe import FinetuneConfig, finetune
    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["byte-bpe"]
    torch.manual_seed(0)
    base = build_model(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=128, n_heads=4, n_layers=2, max_seq_len=128))
    save_model(base, tmp_path / "base", tokenizer=tok)
    common = dict(
        model=str(tmp_path / "base"),
        task="reverse",
        n_train=300,
        n_val=16,
        batch_size=16,
        max_new_tokens=14,
        forgetting_tasks="sort",
        general_text="shakespeare:macbeth",
        general_tokens=512,
        precision="fp32",
        show=1,
    )
    logs = []
    full = finetune(FinetuneConfig(**common, method="full", lr=3e-3, budget="60steps", out=str(tmp_path / "full")), log=logs.append)
    assert full["after"]["answer_loss"] < full["before"]["answer_loss"] - 1.0  # on held-out examples
    assert full["after"]["exact_match"] >= full["before"]["exact_match"]
    assert "untrained_sort" in full["after"] and "general_bpb" in full["after"]
    assert any("[4/7] initial predictions" in m for m in logs) and any("[7/7] predict" in m for m in logs)
    loss = [json.loads(r)["loss"] for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sum(loss[-10:]) < sum(loss[:10]) / 2
    # LoRA: a killed run resumes to the same losses as an uninterrupted one
    lora = dict(common, method="lora", lr=1e-2, budget="12steps", save_every=6)
    finetune(FinetuneConfig(**lora, out=str(tmp_path / "a")), log=lambda m: None)
    finetune(FinetuneConfig(**dict(lora, budget="6steps"), out=str(tmp_path / "b")), log=lambda m: None)
    finetune(FinetuneConfig(**lora, out=str(tmp_path / "b"), resume=True), log=lambda m: None)
    a = [json.loads(r)["loss"] for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r)["loss"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 12 and a[6:] == pytest.approx(b[6:], abs=1e-5)
    assert (tmp_path / "a" / "model.safetensors").exists() or (tmp_path / "a" / "adapter_config.json").exists()


@pytest.mark.slow
def test_finetune_commands_on_the_real_models(tmp_path):
    out = run_cli(
        "finetune",
        "--model",
        "minilm",
        "--method",
        "lora",
        "--task",
        "genre",
        "--budget",
        "4steps",
        "--n-train",
        "64",
        "--n-val",
        "24",
        "--out",
        str(tmp_path / "genre"),
        "--json",
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "roc_auc"} <= set(result["after"]) and "embedding_drift_cosine" in result["after"]
    assert "[1/7] load data" in out.stderr and (tmp_path / "genre" / "labels.json").exists()
    run_cli(
        "finetune",
        "--model",
        "smollm2",
        "--method",
        "lora",
        "--task",
        "dates",
        "--budget",
        "2steps",
        "--n-train",
        "16",
        "--n-val",
        "4",
        "--forgetting-tasks",
        "sort",
        "--n-forgetting",
        "4",
        "--general-tokens",
        "256",
        "--out",
        str(tmp_path / "lora"),
    )
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(tmp_path / "lora").r == 8
    bad = run_cli("finetune", "--model", "minilm", "--task", "arithmetic", "--budget", "1steps", "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 1 and "needs a decoder" in bad.stderr


@pytest.mark.slow
def test_finetune_compare_writes_a_table_and_a_chart(tmp_path, tokenizers_by_kind):
    from llmkit.model.weights import save_model

    tok = tokenizers_by_kind["byte-bpe"]
    torch.manual_seed(0)
    save_model(
        build_model(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_layers=2, max_seq_len=128)),
        tmp_path / "base",
        tokenizer=tok,
    )
    out = run_cli(
        "finetune",
        "compare",
        "--model",
        str(tmp_path / "base"),
        "--task",
        "reverse",
        "--methods",
        "full,lora,multitask-lora,lora+grpo",
        "--shots",
        "0,1",
        "--curve",
        "8",
        "--budget",
        "2steps",
        "--n-train",
        "16",
        "--n-val",
        "4",
        "--n-forgetting",
        "2",
        "--general-tokens",
        "128",
        "--general-text",
        "shakespeare:macbeth",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "cmp"),
    )
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["full", "lora", "multitask-lora", "lora+grpo", "full"]
    assert summary["rows"][-1]["n_train"] == 8
    assert summary["rows"][0]["trainable_share"] == 1.0 and summary["rows"][1]["trainable_share"] < 0.2
    grpo = summary["rows"][3]  # GRPO from the lora row's model: it starts where that row ended, forgetting measured too
    assert grpo["before"] == summary["rows"][1]["after"] and grpo["general_bpb_change"] is not None
    assert set(summary["few_shot"]) == {"0", "1"} and "1-shot in-context" in out.stdout
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


# --- edges: leaks, weighting, budgets, files, packing, resume ------------------------------------------------------


@pytest.mark.parametrize("task", ["arithmetic", "reverse", "sort", "dates"])
def test_validation_is_disjoint_from_training_at_every_size(task):
    val = {e.messages[0]["content"] for e in T.task_examples(task, 48, "val", 0)}
    for n in (100, 400, 1000, 2000, 5000):
        assert val.isdisjoint(e.messages[0]["content"] for e in T.task_examples(task, n, "train", 0)), n


def test_user_files_split_after_deduplication_by_a_seeded_shuffle(tmp_path):
    from llmkit.finetune.recipe import split_rows

    rows = [{"source": f"q{i}", "target": f"a{i}"} for i in range(40)] * 2  # every row twice, in order
    train, val = split_rows(rows, seed=1)
    key = lambda r: r["source"]  # noqa: E731
    assert len(train) + len(val) == 40 and len(val) == 4 and {key(r) for r in train}.isdisjoint(map(key, val))
    assert [key(r) for r in val] != ["q0", "q1", "q2", "q3"] and split_rows(rows, seed=1) == (train, val)
    assert split_rows(rows, seed=2)[1] != val


def test_files_with_line_separators_quoted_newlines_and_bad_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"source": "one\u2028two", "target": "x\ry"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"source": "three", "target": "z"})
        + "\n",
        encoding="utf-8",
    )
    rows = read_rows(tmp_path / "a.jsonl")
    assert [r["source"] for r in rows] == ["one\u2028two", "three"] and rows[0]["target"] == "x\ry"
    (tmp_path / "b.csv").write_bytes(b'text,label\n"first line\nsecond line",a\nplain \xff text,b\n')
    notes = []
    rows = read_rows(tmp_path / "b.csv", warn=notes.append)
    assert rows[0]["text"] == "first line\nsecond line" and rows[1]["text"] == "plain \ufffd text" and len(rows) == 2
    assert notes and "1 invalid UTF-8 byte" in notes[0]


def test_packed_rows_attend_within_each_example_with_positions_from_zero():
    from llmkit.finetune.data import _pack, collate_packed

    model = _tiny_llama()
    examples = [[5, 9, 12, 7], [30, 31, 32], [44, 45, 46, 47, 48]]
    ids, labels, segments = _pack(examples, examples, max_len=16)
    assert len(ids) == 1 and segments[0] == [0] * 4 + [1] * 3 + [2] * 5
    assert labels[0][4] == labels[0][7] == IGNORE and labels[0][5] == 31  # no example learns to predict the next one's start
    x, _, mask, positions = collate_packed(ids, labels, segments, 0)
    assert positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    with torch.no_grad():
        packed = model(x, attention_mask=mask, position_ids=positions)[0]
        start = 0
        for ex in examples:
            alone = model(torch.tensor([ex]))[0]
            assert (packed[start : start + len(ex)] - alone).abs().max().item() <= 1e-5
            start += len(ex)


def test_lora_lives_where_its_base_layer_lives():
    from llmkit.model.lora import LoRALinear

    base = torch.nn.Linear(8, 4, bias=True).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and layer.bias is base.bias  # float32 adapters, as PEFT
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def _ft(tiny_base, out, **kw):
    return small_finetune(tiny_base, out, **kw)


def test_fine_tuning_weighs_every_answer_token_alike_and_ends_on_a_token_budget(tiny_base, tmp_path):
    from llmkit.finetune.recipe import finetune

    first = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        finetune(_ft(tiny_base, tmp_path / f"{batch}x{accum}", batch_size=batch, grad_accum=accum, budget="1steps"), log=lambda m: None)
        first[batch] = json.loads((tmp_path / f"{batch}x{accum}" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first[4] == pytest.approx(first[8], rel=1e-5) and first[2] == pytest.approx(first[8], rel=1e-5)
    result = finetune(_ft(tiny_base, tmp_path / "tokens", budget="1500tokens"), log=lambda m: None)
    rows = [json.loads(r) for r in (tmp_path / "tokens" / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == len(rows) >= 3 and rows[-1]["tokens"] >= 1500 > rows[-2]["tokens"]
    assert rows[-1]["lr"] < rows[1]["lr"]  # the schedule decays over a token budget too


def test_resuming_with_other_lora_targets_is_refused(tiny_base, tmp_path):
    from llmkit.finetune.recipe import finetune

    finetune(_ft(tiny_base, tmp_path, lora_targets="q_proj,v_proj", save_every=1), log=lambda m: None)
    with pytest.raises(LlmkitError, match="another fine-tuning run.*lora_targets"):
        finetune(_ft(tiny_base, tmp_path, lora_targets="all-linear", budget="4steps", resume=True), log=lambda m: None)
    finetune(_ft(tiny_base, tmp_path, lora_targets="q_proj,v_proj", budget="3steps", resume=True), log=lambda m: None)


def test_compare_curves_of_a_multitask_method_keep_the_mixture(tmp_path, monkeypatch):
    from llmkit.finetune import compare as C

    calls = []
    fake = {"before": {"exact_match": 0.0}, "after": {"exact_match": 0.5}, "trainable_share": 0.1, "seconds": 1, "peak_memory_mb": 1}
    monkeypatch.setattr(C, "run_method", lambda base, method, out, extra=None: calls.append((method, extra)) or {**fake, "method": method})
    C.compare(
        [], ["multitask-lora"], tmp_path, task="sort", model="m", shots=[], curve=[8], n_val=4, seed=0, max_new_tokens=4, log=lambda m: None
    )
    assert all("--task" in extra and "--eval-task" in extra for _, extra in calls) and "--n-train" in calls[-1][1]


def test_compare_chains_preference_training_after_sft_on_pairs_the_model_makes(tmp_path, monkeypatch):
    """lora+dpo: DPO from the lora row's model on pairs of that model's own answers (judged by the task's verifier),
    scored on the task; plain grpo from --model; a chain without its SFT row, or too few pairs, is refused by name."""
    from llmkit.errors import LlmkitError
    from llmkit.finetune import compare as C
    from llmkit.finetune import preference

    calls = []
    fake = {"before": {"exact_match": 0.0}, "after": {"exact_match": 0.5}, "trainable_share": 0.1, "seconds": 1, "peak_memory_mb": 1}
    monkeypatch.setattr(C, "run_method", lambda base, method, out, extra=None: calls.append((method, extra)) or {**fake, "method": method})
    made = [{"prompt": f"q{i}", "chosen": "1", "rejected": "2"} for i in range(5)]
    monkeypatch.setattr(preference, "build_pairs", lambda model, task, **kw: (made, {"right": 5, "answers": 20}))
    summary = C.compare(
        [], ["lora", "lora+dpo", "grpo"], tmp_path, task="sort", model="m", shots=[], curve=[], n_val=4, seed=0, max_new_tokens=4,
        log=lambda m: None,
    )  # fmt: skip
    assert [r["method"] for r in summary["rows"]] == ["lora", "lora+dpo", "grpo"]
    (_, sft), (dpo, dpo_extra), (grpo, grpo_extra) = calls
    assert dpo == "dpo" and dpo_extra[:2] == ["--model", str(tmp_path / "lora")] and "--eval-task" in dpo_extra
    pairs = tmp_path.joinpath(dpo_extra[dpo_extra.index("--data") + 1])
    assert [json.loads(line) for line in pairs.read_text().splitlines()] == made
    assert grpo == "grpo" and grpo_extra == ["--model", "m"]
    for methods, words in ((["lora+dpo"], "not listed before it"), (["lora", "lora+sft"], "unknown"), (["grpo", "grpo+dpo"], "unknown"),
                           (["ppo"], "unknown method")):  # fmt: skip
        with pytest.raises(LlmkitError, match=words):
            C.check_methods(methods)
    monkeypatch.setattr(preference, "build_pairs", lambda model, task, **kw: ([], {"right": 0, "answers": 20}))
    calls.clear()  # a row that cannot run is said and left out; the comparison goes on
    said: list[str] = []
    summary = C.compare(
        [], ["dpo", "lora"], tmp_path / "b", task="sort", model="m", shots=[], curve=[], n_val=4, seed=0, max_new_tokens=4,
        log=said.append,
    )  # fmt: skip
    assert [r["method"] for r in summary["rows"]] == ["lora"] and "too few for dpo" in summary["failed"]["dpo"]
    assert any("too few for dpo" in line for line in said)


def test_near_duplicates_are_checked_by_their_true_similarity():
    from llmkit.data.clean import drop_near_duplicates

    words = [f"w{i}" for i in range(400)]
    similar = list(words)
    for i in range(14):  # 5-gram Jaccard 0.70 to the first: LSH (threshold 0.8) proposes it, the true check keeps it
        similar[20 + i * 13] = f"x{i}"
    near = list(words)
    near[200] = "y"  # Jaccard 0.98: a near duplicate
    keep, dropped = drop_near_duplicates([" ".join(words), " ".join(similar), " ".join(near)], threshold=0.8)
    assert keep == [0, 1] and dropped == 1


def test_a_budget_that_does_not_parse_is_refused_before_anything_runs(tmp_path):
    from llmkit.errors import LlmkitError
    from llmkit.finetune.recipe import FinetuneConfig, finetune

    with pytest.raises(LlmkitError, match="cannot read the budget"):
        finetune(FinetuneConfig(budget="abc", out=str(tmp_path / "run")), log=lambda m: None)
    assert not (tmp_path / "run" / "finetune_config.json").exists()


def test_a_finished_fine_tune_says_so_on_resume_and_a_larger_budget_extends_it(tiny_base, tmp_path):
    from llmkit.errors import LlmkitError
    from llmkit.finetune.recipe import finetune

    out = tmp_path / "run"
    assert finetune(_ft(tiny_base, out, budget="2steps"), log=lambda m: None)["steps"] == 2
    with pytest.raises(LlmkitError, match=r"is finished \(2 steps"):
        finetune(_ft(tiny_base, out, budget=None, resume=True), log=lambda m: None)
    said: list[str] = []
    assert finetune(_ft(tiny_base, out, budget="3steps", resume=True), log=said.append)["steps"] == 3
    assert any("extending the finished run" in m and "2steps -> 3steps" in m for m in said)


def test_resume_takes_the_runs_own_options_and_a_refused_resume_changes_nothing(tiny_base, tmp_path):
    """`llmkit finetune --out RUN --resume` continues RUN with the options it was started with (the command line still
    wins); a resume refused for other options leaves the run's finetune_config.json as it was."""
    from llmkit.cli import parse_args
    from llmkit.finetune.recipe import finetune

    out = tmp_path / "run"
    finetune(_ft(tiny_base, out, budget="2steps", n_train=24, lora_r=4), log=lambda m: None)
    args = parse_args(["finetune", "--out", str(out), "--resume"])
    assert (args.n_train, args.lora_r, args.model, args.budget) == (24, 4, str(tiny_base), None)  # the budget: the recipe's rule
    assert parse_args(["finetune", "--out", str(out), "--resume", "--lora-r", "2"]).lora_r == 2
    pretrain_args = parse_args(["pretrain", "--out", str(tmp_path / "nothing-here"), "--resume"])
    assert pretrain_args.d_model is None  # no run there: the defaults
    before = (out / "finetune_config.json").read_text()
    with pytest.raises(LlmkitError, match=r"another fine-tuning run \(lora_r: 4 -> 2\)"):
        finetune(_ft(tiny_base, out, budget="3steps", n_train=24, lora_r=2, resume=True), log=lambda m: None)
    assert (out / "finetune_config.json").read_text() == before
    (tmp_path / "cfg.yaml").write_text("lora_r: 2\n")
    assert parse_args(["finetune", "--out", str(out), "--resume", "--config", str(tmp_path / "cfg.yaml")]).lora_r == 2  # a file wins
    saved = json.loads(before)
    (out / "finetune_config.json").write_text(json.dumps({**saved, "fsdp": True, "checkpointing": True, "rslora": True}))
    args = parse_args(["finetune", "--out", str(out), "--resume"])
    assert (args.fsdp, args.checkpointing, args.rslora) == (False, False, True)  # a flag comes back only where the checkpoint needs it


def test_a_lora_run_names_its_base_so_that_it_loads_from_any_folder(tmp_path, tiny_base, monkeypatch):
    """A base given as a relative path is written as an absolute one (the run works from another directory); an
    embedded name stays a name; a base that is gone is named as the adapter's base."""
    monkeypatch.chdir(tiny_base.parent)
    model = llmkit.load(tiny_base.name)
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_lora(model, tmp_path / "run", base_model_name=tiny_base.name)
    save_lora(model, tmp_path / "named", base_model_name="smollm2")
    monkeypatch.chdir(tmp_path)
    assert io.read_json(tmp_path / "run" / "adapter_config.json")["base_model_name_or_path"] == str(tiny_base.resolve())
    assert io.read_json(tmp_path / "named" / "adapter_config.json")["base_model_name_or_path"] == "smollm2"
    assert llmkit.load(tmp_path / "run").config.extra["adapter"] == str(tmp_path / "run")
    cfg = io.read_json(tmp_path / "run" / "adapter_config.json")
    io.write_json(tmp_path / "run" / "adapter_config.json", {**cfg, "base_model_name_or_path": "gone/base"})
    with pytest.raises(LlmkitError, match="the adapter's base model 'gone/base'"):
        llmkit.load(tmp_path / "run")
