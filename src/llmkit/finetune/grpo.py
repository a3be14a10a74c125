"""`llmkit finetune --method grpo`: reinforcement learning from rewards a program checks (GRPO, Shao et al. 2024).

    1 load data          prompts of a built-in task with a verifier (arithmetic, reverse, sort, dates: the exact
                         answer) or of a file, and the reward: the task's verifier or --reward module:function
    2 prepare model      LoRA (the reference: the same weights, adapters off) or --full (a frozen copy)
    3 initial predictions greedy exact match and mean reward on held-out prompts
    4 train              each step: --batch-size prompts x --group-size sampled completions (the generation code and
                         sampler of `generate`), rewards, group-normalized advantages, the clipped objective with the
                         KL term to the reference, one optimizer step
    5 evaluate           the same measures again
    6 save               the adapter (PEFT format) or the model; results.json, metrics.jsonl, loss.png

The loss, per completion token t of completion i with advantage A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4):

    ratio_t = π(y_t) / π_old(y_t)           (one update per generation: π_old = π, detached, so ratio = 1 with π's gradient)
    L_t     = −min(ratio_t · A_i, clip(ratio_t, 1 − ε, 1 + ε) · A_i) + β · KL_t,
    KL_t    = π_ref/π − log(π_ref/π) − 1    (the k3 estimator, as published)
    "grpo"    the mean over each completion's tokens, then over the completions
    "dr_grpo" (Liu et al. 2025, length-unbiased) the sum over all tokens / (completions x --max-new-tokens), and the
              advantages not divided by the group's std

With --answer-tag (DeepSeek-R1's two rule rewards) each prompt asks for the answer between <answer> and </answer>: the
accuracy reward reads the answer there (no block: 0), and a format reward, 1 when the completion is one answer block
with nothing after it (any reasoning before), is added to it, each weighted 1 as open-r1 does.

Metrics as trl names them: reward, reward_std, kl, completion_length, clip_ratio, frac_reward_zero_std (the groups whose
rewards are all equal: they teach nothing), and each reward's rewards/NAME/mean and /std (accuracy_reward, and with
--answer-tag format_reward).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import torch

from llmkit import io
from llmkit.chat import chat_prompt_ids
from llmkit.data import tasks as T
from llmkit.errors import LlmkitError
from llmkit.finetune.data import IGNORE, read_rows
from llmkit.finetune.preference import reference_mode, token_logps
from llmkit.finetune.recipe import answer, exact_match, general_bits_per_byte, greedy_answers, peak_memory_mb, split_rows
from llmkit.generate import GenerationConfig, generate
from llmkit.model.layers import pad_right
from llmkit.model.lora import apply_method, save_lora, trainable_share
from llmkit.model.weights import load as load_model
from llmkit.model.weights import save_model
from llmkit.progress import progress
from llmkit.train.runtime import Budget, Metrics, autocast_dtype

VERIFIED_TASKS = T.VERIFIED  # built-in tasks whose answers a program checks exactly
LOSS_TYPES = ("grpo", "dr_grpo")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
FORMAT = re.compile(r"(.*?)<answer>(.*?)</answer>\s*", re.S)  # (before, inside): then nothing after the block
TAG = re.compile(r"</?answer>")
TAG_INSTRUCTION = "Put the answer between <answer> and </answer>."


def tagged_answer(completion: str) -> str:
    """The text of the completion's first <answer>...</answer> block ("" when it has none)."""
    m = ANSWER_TAG.search(completion)
    return m.group(1).strip() if m else ""


def format_reward(completion: str) -> float:
    """1 when the completion is (any reasoning, then) one <answer>...</answer> block that holds an answer, with nothing
    after it and no other answer tag anywhere, else 0."""
    m = FORMAT.fullmatch(completion)
    return float(m is not None and not TAG.search(m[1]) and not TAG.search(m[2]) and bool(m[2].strip()))


def task_reward(answer: str, completion: str) -> float:
    """The built-in tasks' verifier: 1 for the exact answer (normalized as exact match is), else 0."""
    return float(T.normalize_answer(completion) == T.normalize_answer(answer))


def load_reward(spec: str):
    """`module:function` or `path/to/file.py:function` -> the function, called as f(prompt=..., completion=...,
    answer=...) -> a number."""
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise LlmkitError(f"--reward {spec!r} is not module:function", "e.g. --reward my_rewards:score (my_rewards.py beside you)")
    import importlib.util
    import sys

    try:
        if module.endswith(".py"):  # a file: loaded under its own name, wherever it is
            if not Path(module).is_file():
                raise ImportError(f"no file at {module}")
            loader = importlib.util.spec_from_file_location(Path(module).stem, module)
            assert loader is not None and loader.loader is not None
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module in the working directory, as `python -m` finds it
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise LlmkitError(f"--reward {spec}: {e}", "give an importable module (or a .py file) and a function in it") from None
    if not callable(fn):
        raise LlmkitError(f"--reward {spec} is not a function", "point at a function of (prompt, completion, answer)")
    return fn


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(P·G,) advantages of rewards (P·G,) in groups of `group` completions per prompt: the reward minus its group's
    mean, divided by the group's standard deviation (+1e-4) unless `scale` is False (Dr. GRPO)."""
    r = rewards.view(-1, group)  # (P, G)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + 1e-4)
    return a.reshape(-1)


def grpo_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    loss_type: str,
    max_completion_length: int,
    old_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of a batch of completions (per-token log-probabilities (B, T), their mask, advantages (B,)) and its
    metrics (kl, clip_ratio): see the module's docstring."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    a = advantages.unsqueeze(1)  # (B, 1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("a KL term needs the reference's log-probabilities")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        raise LlmkitError(f"unknown GRPO loss {loss_type!r}", f"use one of {', '.join(LOSS_TYPES)}")
    tokens = mask.sum().clamp(min=1.0)
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    metrics = {"clip_ratio": float((clipped.float() * mask).sum() / tokens)}
    if kl is not None:
        metrics["kl"] = float((kl.detach() * mask).sum() / tokens)
    return loss, metrics


@dataclasses.dataclass
class Prompt:
    messages: list[dict]
    answer: str | None


class GRPO:
    """The recipe's six printed phases over one run's state (`run()`)."""

    PHASES = ("load data", "prepare model", "initial predictions", "train", "evaluate", "save")

    def __init__(self, cfg, *, log=print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.out)
        self.phases: dict[str, float] = {}

    def run(self) -> dict:
        cfg = self.cfg
        self._check()
        if (self.run_dir / "checkpoint").exists() or (self.run_dir / "results.json").exists():
            raise LlmkitError(f"{self.run_dir} already holds a run", "choose a new --out (GRPO runs do not resume yet)")
        self.budget = Budget.parse(cfg.budget or "100steps")
        torch.manual_seed(cfg.seed)
        io.write_json(self.run_dir / "finetune_config.json", dataclasses.asdict(cfg))
        steps = (self.load_data, self.prepare_model, self.initial_predictions, self.train, self.evaluate, self.save)
        for number, (name, step) in enumerate(zip(self.PHASES, steps), 1):
            self.log(f"[{number}/6] {name}" + (": grpo" if name == "prepare model" else ""))
            started = time.perf_counter()
            step()
            self.phases[name] = round(time.perf_counter() - started, 2)
            self.log(f"      ({self.phases[name]:.1f} s)")
        return self.results()

    def _check(self) -> None:
        cfg = self.cfg
        if cfg.group_size < 2:
            raise LlmkitError(f"--group-size {cfg.group_size}: GRPO compares completions within a group", "use --group-size 4 (or more)")
        self.beta = 0.04 if cfg.beta is None else cfg.beta  # DeepSeekMath's
        if self.beta < 0:
            raise LlmkitError(f"--beta {cfg.beta} must be 0 or more (the KL term's weight)", "e.g. --beta 0.04, or 0 for none")
        if cfg.grpo_loss not in LOSS_TYPES:
            raise LlmkitError(f"--grpo-loss {cfg.grpo_loss} is not one of {', '.join(LOSS_TYPES)}", "use grpo or dr_grpo")
        if not cfg.data and not cfg.reward and not all(t.split(":")[0] in VERIFIED_TASKS for t in cfg.task.split(",")):
            raise LlmkitError(
                f"--task {cfg.task} has no verifier: GRPO needs a reward a program computes",
                f"use one of {', '.join(VERIFIED_TASKS)}, or give --reward module:function",
            )
        self.reward_fn = load_reward(cfg.reward) if cfg.reward else None

    def load_data(self) -> None:
        cfg = self.cfg
        if cfg.data:
            rows = read_rows(cfg.data, warn=self.log)
            # the split every fine-tune uses: duplicates dropped, a seeded shuffle, a tenth held out (or --val-data)
            train, val = (rows, read_rows(cfg.val_data, warn=self.log)) if cfg.val_data else split_rows(rows, cfg.seed, log=self.log)
            to = lambda rs: [  # noqa: E731
                Prompt([{"role": "user", "content": str(r["prompt"])}], None if r.get("answer") is None else str(r["answer"]))
                for r in rs
                if r.get("prompt")
            ]
            self.train_prompts, self.val = to(train), to(val)
            if self.reward_fn is None and any(p.answer is None for p in self.train_prompts + self.val):
                raise LlmkitError(
                    f"{cfg.data}: rows without an answer need a reward function", "add answer fields, or --reward module:function"
                )
        else:
            to = lambda exs: [Prompt(ex.messages[:-1], ex.answer) for ex in exs]  # noqa: E731
            self.train_prompts = to(T.mixture(cfg.task, cfg.n_train, "train", cfg.seed))
            self.val = to(T.mixture(cfg.eval_task or cfg.task, cfg.n_val, "val", cfg.seed))
        if not self.train_prompts:
            raise LlmkitError("no prompts to train on", "give --data rows with a prompt field")
        if cfg.answer_tag:  # the instruction after each question (its last user message)
            for p in self.train_prompts + self.val:
                p.messages = [*p.messages[:-1], {**p.messages[-1], "content": f"{p.messages[-1]['content']}\n{TAG_INSTRUCTION}"}]
        reward = cfg.reward or "the exact answer"
        self.log(
            f"      {len(self.train_prompts)} training and {len(self.val)} validation prompts; reward: "
            + (f"{reward} in <answer></answer> + the format reward" if cfg.answer_tag else reward)
        )

    def rewards(self, prompt: Prompt, completion: str) -> dict[str, float]:
        """The prompt's rewards for `completion`, by name: accuracy_reward (the verifier's or --reward's), and with
        --answer-tag format_reward. With --answer-tag the verifier (or --reward's function, as `completion`) sees the
        text inside the answer block, and a completion without one scores 0. A reward function that raises or returns
        a non-number gives 0 (counted)."""
        answer = tagged_answer(completion) if self.cfg.answer_tag else completion
        asked = not self.cfg.answer_tag or ANSWER_TAG.search(completion) is not None
        out = {"accuracy_reward": self._accuracy(prompt, answer) if asked else 0.0}
        if self.cfg.answer_tag:
            out["format_reward"] = format_reward(completion)
        return out

    def reward(self, prompt: Prompt, completion: str) -> float:
        """The prompt's reward for `completion`: its rewards' sum."""
        return sum(self.rewards(prompt, completion).values())

    def _accuracy(self, prompt: Prompt, answer: str) -> float:
        if self.reward_fn is None:
            return task_reward(prompt.answer or "", answer)
        try:
            value = float(self.reward_fn(prompt=prompt.messages[-1]["content"], completion=answer, answer=prompt.answer))
            if not math.isfinite(value):
                raise ValueError(value)
            return value
        except Exception:  # noqa: BLE001  (a user's function: its failure costs the row, never the run)
            self.reward_errors += 1
            return 0.0

    def prepare_model(self) -> None:
        cfg = self.cfg
        self.model = model = load_model(cfg.model, device=cfg.device)
        self.tok = model.tokenizer
        if model.config.family != "decoder" or self.tok is None:
            raise LlmkitError("GRPO trains a decoder with a tokenizer", "use --model smollm2 or a decoder you trained")
        self.reference = None
        if cfg.full:
            import copy

            self.reference = copy.deepcopy(model).requires_grad_(False).eval() if self.beta else None
        else:
            apply_method(
                model,
                "lora",
                lora_r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                lora_targets=cfg.lora_targets,
                rslora=cfg.rslora,
            )
        self.reward_errors = 0
        self.trainable, self.total = trainable, total = trainable_share(model)
        self.log(f"      {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")

    @torch.no_grad()
    def measure(self) -> dict:
        """Greedy answers to the validation prompts: exact match (where answers are known) and the mean reward."""
        texts = greedy_answers(self.model, self.tok, [p.messages for p in self.val], self.cfg.max_new_tokens, batch=16)
        rewards = [self.reward(p, t) for p, t in zip(self.val, texts)]
        out: dict[str, object] = {"reward": sum(rewards) / len(rewards)}
        known = [(p.answer, tagged_answer(t) if self.cfg.answer_tag else t) for p, t in zip(self.val, texts) if p.answer is not None]
        if known:
            out["exact_match"] = sum(task_reward(a, t) for a, t in known) / len(known)
        if self.cfg.answer_tag:
            out["format_reward"] = sum(map(format_reward, texts)) / len(texts)
        # forgetting, as the other methods measure it: general text's bits per byte and the tasks not trained on
        cfg = self.cfg
        out["general_bpb"] = general_bits_per_byte(self.model, self.tok, cfg)
        trained = "" if cfg.data else cfg.task
        for t in [t for t in cfg.forgetting_tasks.split(",") if t and t != "none" and t not in trained]:
            exs = T.task_examples(t, cfg.n_forgetting, "val", cfg.seed + 7)
            out[f"untrained_{t}"] = exact_match(answer(self.model, self.tok, exs, cfg.max_new_tokens), exs)
        out["_predictions"] = texts[:3]
        return out

    def initial_predictions(self) -> None:
        self.before = self.measure()
        self._say("before", self.before)

    def _say(self, when: str, m: dict) -> None:
        self.log("      " + when + ": " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("_") and isinstance(v, float)))
        for p, got in zip(self.val, m["_predictions"]):
            self.log(f"      Q: {p.messages[-1]['content'][:80]!r}\n      expected {p.answer!r}, got {got.strip()[:60]!r}")

    def sample(self, step: int) -> tuple[list[Prompt], list[list[int]], list[list[int]], torch.Tensor, dict[str, float]]:
        """A step's prompts (seeded by the step), --group-size completions of each, their rewards (P·G,) and each
        reward's mean (trl's rewards/NAME/mean)."""
        cfg, model, tok = self.cfg, self.model, self.tok
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(0, len(self.train_prompts), (cfg.batch_size,), generator=g, device="cpu").tolist()
        prompts = [self.train_prompts[r] for r in rows]
        prompt_ids = [chat_prompt_ids(tok, p.messages) for p in prompts for _ in range(cfg.group_size)]
        model.eval()
        with torch.no_grad():
            gen = GenerationConfig(
                max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature, seed=cfg.seed * 7919 + step
            )
            outs = generate(model, tok, prompt_ids, gen, warn=lambda m: None)
        parts = [self.rewards(p, o.text) for p, o in zip((p for p in prompts for _ in range(cfg.group_size)), outs)]
        rewards = torch.tensor([sum(r.values()) for r in parts], device="cpu")
        means = {}  # each reward function's mean and std over the step's completions, as trl logs them
        for k in parts[0]:
            values = torch.tensor([r[k] for r in parts])
            means[f"rewards/{k}/mean"], means[f"rewards/{k}/std"] = values.mean().item(), values.std().item()
        return prompts, prompt_ids, [o.ids for o in outs], rewards, means

    def train(self) -> None:
        cfg, model = self.cfg, self.model
        device = next(model.parameters()).device
        amp = autocast_dtype(cfg.precision, device)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = cfg.lr or (5e-6 if cfg.full else 1e-4)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        self.metrics = metrics = Metrics(self.run_dir, True, None)
        self.step, start, budget = 0, time.perf_counter(), self.budget
        with progress("steps") as bar:
            task = bar.add_task("grpo", total=budget.steps or budget.seconds or 1)
            while not budget.exhausted(self.step, 0, time.perf_counter() - start):
                _, prompt_ids, completions, rewards, means = self.sample(self.step)
                advantages = group_advantages(rewards, cfg.group_size, scale=cfg.grpo_loss == "grpo").to(device)
                seqs = [p + c for p, c in zip(prompt_ids, completions)]
                labels = [[IGNORE] * len(p) + c for p, c in zip(prompt_ids, completions)]
                x, mask = pad_right(seqs, self.tok.pad_id or 0, device)  # type: ignore[union-attr]  # checked in prepare_model
                y, _ = pad_right(labels, IGNORE, device)
                model.train()
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logps, tmask = token_logps(model(x, attention_mask=mask), y)
                    ref = None
                    if self.beta:
                        with reference_mode(model, self.reference) as reference:
                            ref = token_logps(reference(x, attention_mask=mask), y)[0]
                loss, extra = grpo_loss(
                    logps,
                    ref,
                    advantages,
                    tmask,
                    beta=self.beta,
                    epsilon=cfg.epsilon,
                    loss_type=cfg.grpo_loss,
                    max_completion_length=cfg.max_new_tokens,
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                groups = rewards.view(-1, cfg.group_size)
                flat = float((groups.std(dim=1) == 0).float().mean())  # groups whose rewards are all equal: no gradient
                row = {
                    "step": self.step,
                    "split": "train",
                    "loss": loss.item(),
                    "lr": lr,
                    "reward": rewards.mean().item(),
                    "reward_std": groups.std(dim=1).mean().item(),
                    "completion_length": sum(map(len, completions)) / len(completions),
                    "frac_reward_zero_std": flat,
                    **means,
                    **extra,
                }
                metrics.log(row)
                bar.update(
                    task, completed=self.step if budget.steps else time.perf_counter() - start, description=f"reward {row['reward']:.2f}"
                )
        self.elapsed = time.perf_counter() - start
        rows = [r for r in metrics.rows if r.get("split") == "train"]
        if rows and all(r["frac_reward_zero_std"] == 1.0 for r in rows):
            length = sum(r["completion_length"] for r in rows) / len(rows)
            self.log(
                "      warning: at every step the completions of each group scored alike: the advantages were 0 and nothing "
                f"was learned. Completions averaged {length:.1f} tokens of --max-new-tokens "
                f"{cfg.max_new_tokens}: raise it if they were cut off, give larger --group-size, or start from a model "
                "that gets some answers right (SFT first)"
            )

    def evaluate(self) -> None:
        self.after = self.measure()
        self._say("after", self.after)

    def save(self) -> None:
        if self.cfg.full:
            save_model(self.model, self.run_dir, tokenizer=self.tok)
            self.saved = "model.safetensors + config.json + tokenizer"
        else:
            save_lora(self.model, self.run_dir, base_model_name=self.cfg.model)
            self.saved = "adapter_config.json + adapter_model.safetensors (PEFT format)"

    def results(self) -> dict:
        rows = self.metrics.rows
        result = {
            "model": self.cfg.model,
            "method": "grpo",
            "task": self.cfg.data or self.cfg.task,
            "steps": self.step,
            "seconds": round(self.elapsed, 1),
            "trainable": self.trainable,
            "parameters": self.total,
            "trainable_share": self.trainable / self.total,
            "peak_memory_mb": peak_memory_mb(),  # the process's resident memory
            "before": {k: v for k, v in self.before.items() if not k.startswith("_")},
            "after": {k: v for k, v in self.after.items() if not k.startswith("_")},
            "eval": {k: v for k, v in self.after.items() if not k.startswith("_")},
            "reward_errors": self.reward_errors,
            "final_reward": sum(r["reward"] for r in rows[-10:]) / max(len(rows[-10:]), 1) if rows else None,
            "saved": self.saved,
            "phases": self.phases,
        }
        io.write_json(self.run_dir / "results.json", result)
        self.metrics.plot(self.run_dir / "loss.png", title="GRPO loss")
        self.log(f"done: {self.saved} -> {self.run_dir}")
        return result


def grpo(cfg, *, log=print) -> dict:
    """Run GRPO (its six phases) with a FinetuneConfig; returns what results.json holds."""
    return GRPO(cfg, log=log).run()


__all__ = ["GRPO", "format_reward", "grpo", "grpo_loss", "group_advantages", "load_reward", "tagged_answer", "task_reward", "token_logps"]
