"""Preference training (issue 30): DPO, IPO and ORPO losses and gradients equal trl's on a tiny model and a fixed batch;
the DPO loss of a policy equal to its reference is ln 2; pair rows are read, bad ones counted and left out; a DPO run
raises its reward accuracy; the arena's votes export as pairs (and ratings as KTO rows)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError

from conftest import run_cli, tiny_model


@pytest.fixture(scope="module")
def tok(tokenizers_by_kind):
    return tokenizers_by_kind["byte-bpe"]


def _pairs():
    from llmkit.finetune.preference import read_pairs

    rows = [
        {"prompt": "Reverse: apple river stone", "chosen": "stone river apple", "rejected": "apple river stone"},
        {"prompt": "Sort: pear fig", "chosen": "fig pear", "rejected": "pear fig, I think"},
        {"prompt": "Name a colour.", "system": "Answer in one word.", "chosen": "Blue", "rejected": "I like many colours a lot"},
    ]
    return read_pairs(rows)[0]


def _batch(model, tok, pairs):
    from llmkit.finetune.preference import encode_pairs, pair_batch

    enc = encode_pairs(tok, pairs, 128)
    return pair_batch(enc, list(range(len(enc.chosen))), tok.pad_id or 0)


def _policy(tok, seed=0):
    """A tiny decoder with LoRA adapters whose B is not zero: the policy differs from its reference (adapters off)."""
    from llmkit.model.lora import apply_method, lora_layers

    model = tiny_model("tiny-llama", tok.vocab_size, seed=seed, max_seq_len=128)
    apply_method(model, "lora", lora_dropout=0.0)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    return model


def test_the_dpo_loss_of_a_policy_equal_to_its_reference_is_ln2(tok):
    from llmkit.finetune.preference import PreferenceLoss
    from llmkit.model.lora import apply_method

    model = tiny_model("tiny-llama", tok.vocab_size, max_seq_len=128)
    apply_method(model, "lora")  # B starts at zero: the policy is its reference
    model.eval()
    x, mask, y = _batch(model, tok, _pairs())
    loss, metrics = PreferenceLoss("dpo", beta=0.1)(model, x, mask, y)
    assert loss.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0


class _Outputs(SimpleNamespace):
    pass


def _trl_head(model, disabled: bool):
    """What trl's fused LM head returns for (input_ids, labels): the log-probability of each next label (0 where it is
    -100), the entropy, the mean logit and whether the label is the top token, computed from our model's logits."""
    from llmkit.model.lora import lora_layers

    class Head(torch.nn.Module):
        training = True
        is_gradient_checkpointing = False

        def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=False):
            for layer in lora_layers(model).values():
                layer.disabled = disabled
            try:
                logits = model(input_ids, attention_mask=attention_mask)[:, :-1].float()
            finally:
                for layer in lora_layers(model).values():
                    layer.disabled = False
            target = labels[:, 1:]
            keep = target != -100
            logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            probs = logits.softmax(-1)
            return _Outputs(
                log_probs=logp,
                entropy=-(probs * logits.log_softmax(-1)).sum(-1),
                mean_logits=logits.mean(-1),
                is_top1=logits.argmax(-1) == target,
            )

    return Head()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trls_loss_and_gradients(tok, loss_type):
    """trl's DPOTrainer._compute_loss (its own code: log-ratios, the sigmoid / length-normalized IPO loss, the mean over
    pairs) run on the same model and batch as llmkit's `PreferenceLoss`: the same loss and the same LoRA gradients."""
    from trl.trainer.dpo_trainer import DPOTrainer

    from llmkit.finetune.preference import PreferenceLoss
    from llmkit.model.lora import lora_layers

    model = _policy(tok)
    x, mask, y = _batch(model, tok, _pairs())
    n = x.shape[0] // 2
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]

    ours, metrics = PreferenceLoss("ipo" if loss_type == "ipo" else "dpo", beta=0.1)(model, x, mask, y)
    ours = ours / n  # the mean over pairs, as trl reports it
    ours_grads = torch.autograd.grad(ours, params)

    identity = lambda t: t  # noqa: E731
    fake = SimpleNamespace(
        model=_trl_head(model, disabled=False),
        # trl's reference: a separate copy of the base without LoRA (llmkit's switches its adapters off instead)
        ref_model=_trl_head(tiny_model("tiny-llama", tok.vocab_size, seed=0, max_seq_len=128), disabled=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity, unwrap_model=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        use_weighting=False,
        beta=0.1,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": x, "attention_mask": mask, "completion_mask": (y != -100).long()}
    theirs = DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    theirs_grads = torch.autograd.grad(theirs, params)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logged = fake._metrics["train"]
    assert abs(logged["rewards/margins"][0]) > 1e-4  # the policy is not its reference: the comparison is not vacuous
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] / n == pytest.approx(logged[key][0], abs=1e-5), key


def test_orpo_equals_trls_odds_ratio_loss_and_log_probabilities(tok):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from llmkit.finetune.preference import PreferenceLoss, answer_logps, orpo_losses

    model = _policy(tok)
    x, mask, y = _batch(model, tok, _pairs())
    n = x.shape[0] // 2
    logits = model(x, attention_mask=mask)
    sums, counts = answer_logps(logits, y)
    torch.testing.assert_close(sums, ORPOTrainer.get_batch_logps(logits, y, average_log_prob=False), rtol=1e-6, atol=1e-5)
    average = ORPOTrainer.get_batch_logps(logits, y, average_log_prob=True)
    torch.testing.assert_close(sums / counts, average, rtol=1e-6, atol=1e-6)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    their_losses, their_c, their_r, _, _ = ORPOTrainer.odds_ratio_loss(fake, average[:n], average[n:])
    our_odds, our_c, our_r = orpo_losses(average[:n], average[n:], 0.25)
    torch.testing.assert_close(our_odds, -their_losses)  # trl adds −mean(losses) to the NLL
    torch.testing.assert_close(our_c, their_c)
    torch.testing.assert_close(our_r, their_r)
    # one pair: trl's loss (NLL over the chosen tokens − β·log σ(log odds)) and its gradients
    x1, m1, y1 = _batch(model, tok, _pairs()[:1])
    params = [p for p in model.parameters() if p.requires_grad]
    ours, _ = PreferenceLoss("orpo", beta=0.25)(model, x1, m1, y1)
    logits1 = model(x1, attention_mask=m1)
    avg1 = ORPOTrainer.get_batch_logps(logits1, y1, average_log_prob=True)
    nll = F.cross_entropy(logits1[:1, :-1].reshape(-1, logits1.shape[-1]), y1[:1, 1:].reshape(-1), ignore_index=-100)
    theirs = nll - ORPOTrainer.odds_ratio_loss(fake, avg1[:1], avg1[1:])[0].mean()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_pair_rows_bad_rows_and_bad_settings(tmp_path, tok, tiny_base):
    from llmkit.finetune.preference import PreferenceLoss, read_pairs

    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}],
        },
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": " ", "rejected": "b"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
    ]
    pairs, skipped = read_pairs(rows)
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == [("p", "a", "b"), ("q", "x", "y")]
    assert skipped == {"chosen = rejected": 1, "empty side": 1, "no prompt": 1, "missing side": 1}
    with pytest.raises(LlmkitError, match="beta"):
        PreferenceLoss("dpo", beta=0.0)
    with pytest.raises(LlmkitError, match="label-smoothing"):
        PreferenceLoss("dpo", label_smoothing=0.5)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] * 4))
    base = tiny_base
    for args, words in (
        (["--method", "dpo"], "--data pairs.jsonl"),
        (["--method", "lora", "--data", str(data)], "--method dpo or orpo"),
        (["--method", "dpo", "--data", str(data), "--beta", "-1"], "--beta"),
        (["--method", "orpo", "--data", str(data), "--loss", "ipo"], "--loss ipo is a DPO loss"),
        (["--method", "lora", "--full"], "--full chooses full training for dpo, orpo and grpo"),
        (["--method", "dpo", "--data", str(data), "--pack"], "--pack"),
    ):
        proc = run_cli("finetune", "--model", str(base), *args, "--out", str(tmp_path / "r"), check=False, timeout=300)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_dpo_raises_the_reward_accuracy_and_orpo_learns_the_chosen_answers(tmp_path, tiny_base):
    from llmkit.data import tasks as T
    from llmkit.finetune.recipe import FinetuneConfig, finetune

    rows = []
    for ex in T.task_examples("reverse", 160, "train", 0):
        wrong = " ".join(reversed(ex.answer.split()))  # the words as given: the wrong answer
        if wrong != ex.answer:
            rows.append({"prompt": ex.messages[-2]["content"], "chosen": ex.answer, "rejected": wrong})
    rows += [{"prompt": "x", "chosen": "same", "rejected": "same"}, {"prompt": "y", "chosen": "", "rejected": "z"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(
        model=str(tiny_base),
        data=str(data),
        budget="60steps",
        lr=5e-3,
        warmup=2,
        forgetting_tasks="",
        general_text="shakespeare:macbeth",
        general_tokens=64,
        max_new_tokens=4,
        show=0,
        precision="fp32",
    )
    logs: list[str] = []
    dpo = finetune(FinetuneConfig(**common, method="dpo", beta=0.5, out=str(tmp_path / "dpo")), log=logs.append)
    assert any("2 row(s) left out" in m or "1 row(s) left out" in m for m in logs)
    train = [json.loads(r) for r in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    late = train[-10:]
    assert sum(r["loss"] for r in late) / 10 < 0.6 and sum(r["rewards/accuracies"] for r in late) / 10 > 0.65
    rewards = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert set(dpo["eval"]) == {"loss", "logps/chosen", "logps/rejected", *rewards}
    assert dpo["before"]["rewards/margins"] == 0.0 and dpo["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "dpo" / "adapter_config.json").exists()
    orpo = finetune(
        FinetuneConfig(**{**common, "forgetting_tasks": "reverse,sort"}, method="orpo", beta=0.5, eval_task="reverse", n_val=4,
                       n_forgetting=2, out=str(tmp_path / "orpo")),
        log=lambda m: None,
    )  # fmt: skip
    assert orpo["after"]["nll_loss"] < orpo["before"]["nll_loss"] - 0.5  # the chosen answers grow likely
    # pairs made from a task (--eval-task): its held-out questions are scored, and it is not counted as forgetting
    assert "exact_match" in orpo["before"] and "exact_match" in orpo["after"]
    assert "untrained_sort" in orpo["after"] and "untrained_reverse" not in orpo["after"]


def test_build_pairs_sorts_a_models_own_answers_by_the_verifier(tok, monkeypatch):
    """A question with a right and a wrong sampled answer is one pair (chosen right, rejected wrong; an empty answer is
    neither); all right or all wrong is none; a task without a verifier, or one sample, is refused."""
    from llmkit import generate as G
    from llmkit.data import tasks as T
    from llmkit.finetune.preference import build_pairs

    examples = T.task_examples("arithmetic", 3, "train", 0)
    a = [ex.answer for ex in examples]
    said = [[a[0], "7", f"{a[0]}.", ""], [a[1]] * 4, ["7", "", "7", "8"]]  # per question, its 4 samples
    calls = []

    def fake(model, tokenizer, prompts, cfg, warn=None):
        k = len(calls)
        calls.append(cfg.seed)
        return [SimpleNamespace(text=said[i][k]) for i in range(len(prompts))]

    monkeypatch.setattr(G, "generate", fake)
    pairs, counts = build_pairs(SimpleNamespace(tokenizer=tok), "arithmetic", prompts=3, samples=4, log=lambda m: None)
    assert counts == {"questions": 3, "answers": 12, "right": 6, "pairs": 1} and len(set(calls)) == 4  # a seed per sample
    assert pairs == [{"prompt": examples[0].messages[-2]["content"], "chosen": pairs[0]["chosen"], "rejected": "7"}]
    assert pairs[0]["chosen"] in (a[0], f"{a[0]}.")
    for task, samples, words in (("play", 4, "has no verifier"), ("arithmetic", 1, "--samples 1")):
        with pytest.raises(LlmkitError, match=words):
            build_pairs(SimpleNamespace(tokenizer=tok), task, prompts=3, samples=samples)


def test_arena_votes_export_as_preference_pairs_and_ratings_as_kto_rows(tmp_path):
    from llmkit.serve.votes import VoteStore

    db = tmp_path / "votes.db"
    store = VoteStore(db)
    decided = []
    for i, winner in enumerate(["a", "b", "tie", "both_bad", "a"]):
        battle, answer_a, answer_b = store.add_battle(
            prompt=f"q{i}",
            system="be brief" if i == 0 else None,
            settings={},
            model_a="m1",
            model_b="m2",
            answer_a=f"A{i}",
            answer_b=f"B{i}",
        )
        store.vote(battle, winner)
        decided.append((battle, winner))
        store.rate(answer_a, [5, 1, 3, 4, 2][i], session=f"s{i}")
    store.close()
    proc = run_cli("eval", "arena", "--db", str(db), "--export-pairs", str(tmp_path / "p.jsonl"), "--export-kto", str(tmp_path / "k.jsonl"))
    pairs = [json.loads(r) for r in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"], p["chosen_model"]) for p in pairs] == [
        ("q0", "A0", "B0", "m1"),
        ("q1", "B1", "A1", "m2"),
        ("q4", "A4", "B4", "m1"),
    ]
    assert pairs[0]["system"] == "be brief" and "system" not in pairs[1] and pairs[0]["battle_id"] == decided[0][0]
    said = proc.stdout + proc.stderr
    assert "1 ties" in said and "1 both bad" in said
    kto = [json.loads(r) for r in (tmp_path / "k.jsonl").read_text().splitlines()]
    assert [(k["completion"], k["label"]) for k in kto] == [("A0", True), ("A1", False), ("A3", True), ("A4", False)]
    from llmkit.finetune.data import read_rows
    from llmkit.finetune.preference import read_pairs

    assert len(read_pairs(read_rows(tmp_path / "p.jsonl"))[0]) == 3  # what finetune --method dpo reads


# --- GRPO ---------------------------------------------------------------------------------------------------------


def _grpo_batch(tok, seed=0):
    """Two prompts x 3 completions of a tiny policy: (model, ids, attention mask, labels, completion part's columns)."""
    from llmkit.model.layers import pad_right

    model = _policy(tok, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [tok.encode("Reverse: apple river"), tok.encode("Sort: pear fig")]
    completions = [torch.randint(5, tok.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 4, 1)]
    pids = [prompts[i // 3] for i in range(6)]
    width = max(map(len, pids))  # trl's layout: prompts left-padded to one width, completions right-padded after them
    x, mask = pad_right([[0] * (width - len(p)) + p + c for p, c in zip(pids, completions)], 0)
    mask = torch.stack(
        [
            torch.tensor([0] * (width - len(p)) + [1] * (len(p) + len(c)) + [0] * (x.shape[1] - width - len(c)))
            for p, c in zip(pids, completions)
        ]
    )
    y, _ = pad_right([[-100] * width + c for c in completions], -100)
    return model, x, mask, y, width


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_grpo_equals_trls_loss_and_gradients(tok, loss_type):
    """trl's GRPOTrainer._compute_loss (clipped ratio, k3 KL to the reference, GRPO's or Dr. GRPO's aggregation) on the
    same per-token log-probabilities, advantages and old log-probabilities (off-policy, so the clip acts) as
    llmkit's `grpo_loss`: the same loss, gradients and KL / clip metrics."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    from llmkit.finetune.grpo import group_advantages, grpo_loss, token_logps
    from llmkit.model.lora import lora_layers

    model, x, mask, y, width = _grpo_batch(tok)
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 3, scale=loss_type == "grpo")
    manual = rewards.view(2, 3)
    expected = (manual - manual.mean(1, keepdim=True)) / ((manual.std(1, keepdim=True) + 1e-4) if loss_type == "grpo" else 1)
    torch.testing.assert_close(advantages, expected.reshape(-1))  # trl's group normalization
    logps, tmask = token_logps(model(x, attention_mask=mask), y)
    logps, tmask = logps[:, width - 1 :], tmask[:, width - 1 :]  # the completion's columns, as trl keeps them
    torch.manual_seed(3)
    old = (logps.detach() + 0.3 * torch.randn_like(logps)) * tmask
    ref = (logps.detach() + 0.2 * torch.randn_like(logps)) * tmask
    ours, metrics = grpo_loss(
        logps, ref, advantages, tmask, beta=0.04, epsilon=0.2, loss_type=loss_type, max_completion_length=8, old_logps=old
    )
    ours_grads = torch.autograd.grad(ours, params, retain_graph=True)

    identity = lambda t, **k: t  # noqa: E731
    metrics_log = {"train": defaultdict(list), "eval": defaultdict(list)}
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.04,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=8,
        _entropy_bonus_enabled=False,
        _metrics=metrics_log,
        accelerator=SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity),
    )
    inputs = {
        "prompt_ids": x[:, :width],
        "prompt_mask": mask[:, :width],
        "completion_ids": x[:, width:],
        "completion_mask": tmask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    theirs = GRPOTrainer._compute_loss(fake, None, inputs)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    for a, b in zip(ours_grads, torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert metrics["kl"] == pytest.approx(metrics_log["train"]["kl"][0], abs=1e-6)
    assert metrics["clip_ratio"] == pytest.approx(metrics_log["train"]["clip_ratio/region_mean"][0], abs=1e-6) and metrics["clip_ratio"] > 0


def test_grpo_steps_toward_the_rewarded_completions_and_counts_a_broken_reward(tmp_path, tiny_base, monkeypatch):
    """One GRPO update raises the log-probability of the completions with a positive advantage over those with a
    negative one (Σ A·Δlog π > 0); a run with a reward function that raises or returns a non-number completes, its
    rows scoring 0 and counted; a task without a verifier, and a group of one, are refused."""
    from llmkit.finetune.grpo import GRPO, group_advantages, grpo_loss, token_logps
    from llmkit.finetune.recipe import FinetuneConfig
    from llmkit.model.layers import pad_right

    (tmp_path / "rewards.py").write_text(
        "def count_e(prompt, completion, answer):\n    return completion.count('e') / max(len(completion), 1)\n"
        "def broken(prompt, completion, answer):\n    if len(completion) % 2:\n        raise RuntimeError('odd')\n    return 'x'\n"
    )
    monkeypatch.chdir(tmp_path)
    common = dict(model=str(tiny_base), method="grpo", task="reverse", n_val=4, batch_size=2, group_size=4, max_new_tokens=6)
    run = GRPO(FinetuneConfig(**common, reward="rewards:count_e", beta=0.0, precision="fp32", out=str(tmp_path / "a")), log=lambda m: None)
    run._check()
    run.load_data()
    run.prepare_model()
    params = [p for p in run.model.parameters() if p.requires_grad]
    _, pids, completions, rewards, _ = run.sample(0)
    advantages = group_advantages(rewards, 4)
    x, mask = pad_right([p + c for p, c in zip(pids, completions)], 0)
    y, _ = pad_right([[-100] * len(p) + c for p, c in zip(pids, completions)], -100)
    run.model.train()
    logps, tmask = token_logps(run.model(x, attention_mask=mask), y)
    grpo_loss(logps, None, advantages, tmask, beta=0.0, epsilon=0.2, loss_type="grpo", max_completion_length=6)[0].backward()
    torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad():
        after, _ = token_logps(run.model(x, attention_mask=mask), y)
    assert (advantages * ((after - logps.detach()) * tmask).sum(-1)).sum() > 0

    said: list[str] = []
    result = GRPO(FinetuneConfig(**common, reward="rewards:broken", budget="2steps", out=str(tmp_path / "b")), log=said.append).run()
    assert result["steps"] == 2 and result["reward_errors"] > 0
    assert any("nothing was learned" in m for m in said)  # every reward 0: every group flat, and the run says so
    assert (tmp_path / "b" / "adapter_config.json").exists() and (tmp_path / "b" / "metrics.jsonl").exists()
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "reward_std", "completion_length", "clip_ratio", "kl", "frac_reward_zero_std"} <= set(rows[0])
    assert rows[0]["frac_reward_zero_std"] == 1.0
    rows = tmp_path / "rows.jsonl"  # a file of prompts and answers: split as every fine-tune's data is (seeded, disjoint)
    rows.write_text("".join(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n" for w in "abcdefghijklmnopqrst"))
    split = GRPO(FinetuneConfig(**{**common, "data": str(rows)}, out=str(tmp_path / "d")), log=lambda m: None)
    split._check()
    split.load_data()
    train, val = {p.answer for p in split.train_prompts}, {p.answer for p in split.val}
    assert len(train) == 18 and len(val) == 2 and not train & val and val != {"a", "b"}  # shuffled, not the file's head
    # the command line routes --method grpo to this recipe (and its --reward, --grpo-loss)
    proc = run_cli(
        "finetune", "--model", str(tiny_base), "--method", "grpo", "--task", "reverse", "--reward", "rewards:count_e",
        "--grpo-loss", "dr_grpo", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--n-val", "2",
        "--budget", "1steps", "--out", str(tmp_path / "cli"), "--json", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert json.loads(proc.stdout.strip().splitlines()[-1])["method"] == "grpo" and (tmp_path / "cli" / "adapter_config.json").exists()
    for kw, words in ((dict(task="play"), "has no verifier"), (dict(group_size=1), "--group-size 1")):
        with pytest.raises(LlmkitError, match=words):
            GRPO(FinetuneConfig(**{**common, **kw}, out=str(tmp_path / "c")), log=lambda m: None).run()


def test_the_answer_tag_format_reward_reads_the_answer_there_and_rewards_the_form(tmp_path, tiny_base):
    """--answer-tag (DeepSeek-R1's two rule rewards; open-r1's format reward wants <think> before the block, llmkit's
    the block only): the prompt asks for <answer></answer>; the accuracy reward reads the answer there, the format
    reward is 1 only for one non-empty block ending the completion; both reach metrics.jsonl under trl's names
    (rewards/NAME/mean and /std); --answer-tag on another method is refused."""
    from llmkit.finetune.grpo import GRPO, format_reward, tagged_answer
    from llmkit.finetune.recipe import FinetuneConfig, finetune

    cases = {
        "<answer>42</answer>": (1.0, "42"),
        "6 times 7 is 42.\n<answer> 42 </answer>\n": (1.0, "42"),
        "<answer>42</answer> and more": (0.0, "42"),
        "<answer>4</answer><answer>42</answer>": (0.0, "4"),
        "<answer></answer>": (0.0, ""),
        "42": (0.0, ""),
        "<answer>42": (0.0, ""),
        "<answer> </answer>": (0.0, ""),
        "x</answer><answer>4</answer>": (0.0, "4"),
        "<answer><answer>4</answer>": (0.0, "<answer>4"),
    }
    for text, (form, inside) in cases.items():
        assert (format_reward(text), tagged_answer(text)) == (form, inside), text
    cfg = FinetuneConfig(model=str(tiny_base), method="grpo", task="arithmetic", n_val=4, batch_size=2, group_size=2, max_new_tokens=4)
    run = GRPO(dataclasses.replace(cfg, answer_tag=True, budget="2steps", out=str(tmp_path / "g")), log=lambda m: None)
    run._check()
    run.load_data()
    assert all(p.messages[-1]["content"].endswith("<answer> and </answer>.") for p in run.train_prompts + run.val)
    question = run.val[0]
    right, bare = f"<answer>{question.answer}</answer>", str(question.answer)
    assert run.rewards(question, right) == {"accuracy_reward": 1.0, "format_reward": 1.0}
    assert run.rewards(question, bare) == {"accuracy_reward": 0.0, "format_reward": 0.0}  # right, but not where it was asked
    assert run.reward(question, f"It is <answer>{question.answer}</answer> I think") == 1.0  # right answer, wrong form
    result = GRPO(dataclasses.replace(cfg, answer_tag=True, budget="2steps", out=str(tmp_path / "h")), log=lambda m: None).run()
    rows = [json.loads(r) for r in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    names = {f"rewards/{k}_reward/{s}" for k in ("accuracy", "format") for s in ("mean", "std")}
    assert names <= set(rows[0]) and "format_reward" in result["after"]
    with pytest.raises(LlmkitError, match="--answer-tag shapes GRPO"):
        finetune(dataclasses.replace(cfg, method="lora", answer_tag=True, out=str(tmp_path / "i")), log=lambda m: None)


def test_a_reward_function_loads_from_a_module_or_a_file_and_bad_ones_are_named(tmp_path, monkeypatch):
    from llmkit.finetune.grpo import load_reward

    examples = Path(__file__).resolve().parents[1] / "examples"
    score = load_reward(f"{examples / 'my_rewards.py'}:score")  # the README's example, by path
    assert [score(prompt="p", completion=c, answer="42") for c in ("42", " 42\n", "it is 42", "41")] == [1.0, 1.0, 0.2, 0.0]
    (tmp_path / "mine.py").write_text("def r(prompt, completion, answer=None):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward("mine:r")(prompt="", completion="abc") == 3  # a module beside you, as `python -m` finds it
    for spec, message in (("mine", "not module:function"), ("mine:nope", "has no attribute 'nope'"), ("no/such.py:f", "no file at")):
        with pytest.raises(LlmkitError, match=message):
            load_reward(spec)
