"""`llmkit finetune`: the fine-tuning recipe, its steps printed as it goes.

    1 load data          a built-in task (or a mixture, or a file): training and validation examples
    2 preprocess         render through the chat template, loss mask on the answers; count dropped / truncated rows
    3 prepare model      full fine-tuning, LoRA (on a 4-bit base: QLoRA), or bottleneck adapters; the trainable share
    4 initial predictions the task metric, the forgetting measures and a few answers before training
    5 train              AdamW, warmup + cosine, gradient accumulation, autocast, activation checkpointing; DDP / FSDP2
                         under torchrun (pretraining's runtime); checkpoints that resume exactly
    6 evaluate           the task metric and the forgetting measures again
    7 predict            the same few answers after training

Forgetting, measured rather than guessed: bits per byte of the model on held-out general text (a Shakespeare play)
and the accuracy on built-in tasks it was not trained on, before and after. Encoders (classification) report the
drift of their sentence embeddings on general text instead: the mean cosine between before and after.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit import io
from llmkit.chat import chat_prompt_ids
from llmkit.data import tasks as T
from llmkit.data.sources import read_source
from llmkit.devices import resolve as resolve_device
from llmkit.errors import LlmkitError
from llmkit.evaluate import glue
from llmkit.evaluate.metrics import Examples, metric_value
from llmkit.evaluate.perplexity import evaluate_text
from llmkit.finetune.data import IGNORE, Example, collate, collate_packed, prepare_examples, read_rows, to_example
from llmkit.finetune.preference import PreferenceLoss, encode_pairs, is_pair_row, pair_batch, read_pairs
from llmkit.generate import GenerationConfig, generate
from llmkit.model.classifier import REGRESSION, Classifier, batch_tensors, encode_rows, predict, save_classifier
from llmkit.model.lora import METHOD_FIELDS, apply_method, check_peft_names, merge_and_unwrap, save_lora, trainable_share
from llmkit.model.quantize import FROZEN_4BIT, quantize_frozen
from llmkit.model.weights import load as load_model
from llmkit.model.weights import save_model
from llmkit.progress import progress
from llmkit.train.checkpoint import load_checkpoint, resume_point, save_checkpoint, set_rng_states
from llmkit.train.runtime import (
    Budget,
    Dist,
    Metrics,
    accumulate_gradients,
    all_reduce,
    autocast_dtype,
    barrier,
    init_distributed,
    learning_rate,
)

DEFAULT_BUDGET = "100steps"
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "adapter": 1e-3, "dpo": 2e-4, "orpo": 2e-4, "dpo-full": 5e-6, "orpo-full": 5e-6}


@dataclass
class FinetuneConfig:
    model: str = "smollm2"
    method: str = "lora"  # full | lora | qlora (lora on a frozen 4-bit base) | adapter | dpo | orpo (preference pairs)
    loss: str = "sigmoid"  # dpo: sigmoid (DPO) | ipo
    beta: float | None = None  # dpo: the KL strength β (0.1); orpo: the odds-ratio weight λ (0.1); grpo: the KL term's (0.04)
    group_size: int = 4  # grpo: completions sampled per prompt
    reward: str | None = None  # grpo: module:function instead of the task's verifier
    grpo_loss: str = "grpo"  # grpo | dr_grpo
    epsilon: float = 0.2  # grpo: the ratio's clip
    temperature: float = 1.0  # grpo: sampling temperature
    answer_tag: bool = False  # grpo: ask for the answer in <answer></answer>, read it there, add the format reward
    label_smoothing: float = 0.0  # dpo: conservative DPO's ε (the share of pairs assumed mislabelled)
    full: bool = False  # dpo, orpo, grpo: train every weight (DPO and GRPO keep a frozen reference copy) instead of LoRA
    quantize: str = "none"  # the frozen base of lora in 4 bits: int4 (CPU kernel) | nf4 (CUDA, bitsandbytes) | auto | none
    checkpointing: bool = False  # activation checkpointing: recompute each block's activations in the backward pass
    optim: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit states, CUDA only)
    fsdp: bool = False  # under torchrun: shard full fine-tuning with FSDP2 (default: DDP, every rank a whole copy)
    task: str = "arithmetic"  # a built-in task, a mixture 'arithmetic:2,reverse:1', or genre (encoders)
    eval_task: str | None = None  # evaluate on this task (default: the training task or mixture)
    data: str | None = None  # a file of rows instead of a built-in task (or, with glue, the task's official file or folder)
    glue: str | None = None  # a GLUE/SuperGLUE task: read --data in its official layout, score with its official metrics
    regression: bool = False  # numeric labels are scores to predict (default: only when some are not whole numbers)
    val_data: str | None = None
    n_train: int = 400
    n_val: int = 48
    budget: str | None = None  # None: DEFAULT_BUDGET, or with `resume` the run's own (a finished run is then refused)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # default by method: full 5e-5, lora and adapter 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    max_len: int = 256
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    rslora: bool = False
    adapter_size: int = 32
    train_on_prompt: bool = False
    pack: bool = False
    truncate: bool = False
    precision: str = "auto"
    device: str = "auto"  # auto (CUDA, then MPS, then the CPU) | cpu | cuda | cuda:N | mps
    max_new_tokens: int = 12
    forgetting_tasks: str = "arithmetic,reverse,sort,dates"
    n_forgetting: int = 24  # examples per untrained task
    general_text: str = "shakespeare:the-tempest"
    general_tokens: int = 2048
    show: int = 3
    save_every: int | None = None
    seed: int = 0
    out: str = "runs/finetune"
    resume: bool = False


# --- steps ------------------------------------------------------------------------------------------------------


def split_rows(rows: list[dict], seed: int, val_fraction: float = 0.1, log=None) -> tuple[list[dict], list[dict]]:
    """(training, validation) rows of one file: duplicates dropped first, then a seeded shuffle, a tenth held out, so
    the two never share a row (whatever order the file is in)."""
    import random

    unique = list({_json_key(r): r for r in rows}.values())
    if len(unique) < len(rows) and log is not None:
        log(f"      {len(rows) - len(unique)} duplicate row(s) dropped before the split")
    if len(unique) < 2:
        raise LlmkitError(
            f"the data has {len(unique)} distinct row(s): nothing to hold out for validation", "add rows, or pass --val-data FILE"
        )
    random.Random(seed).shuffle(unique)
    cut = max(1, round(len(unique) * val_fraction))
    return unique[cut:], unique[:cut]


def _json_key(obj) -> str:
    """One string per distinct JSON value (dict order aside): what deduplication and splits compare."""
    import json

    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def split_pairs_by_prompt(rows: list[dict], seed: int, val_fraction: float = 0.1, log=None) -> tuple[list[dict], list[dict]]:
    """(training, validation) preference rows: the same pair exported twice (two battles) counted once, then whole
    prompts held out (seeded), so validation never asks a question training answered."""
    import random

    unique: dict[str, dict] = {}
    for r in rows:
        unique.setdefault(_json_key([r.get(k) for k in ("system", "prompt", "chosen", "rejected")]), r)
    if len(unique) < len(rows) and log is not None:
        log(f"      {len(rows) - len(unique)} duplicate pair(s) dropped before the split")
    groups: dict[str, list[dict]] = {}
    for r in unique.values():
        groups.setdefault(_json_key([r.get("system"), r.get("prompt")]), []).append(r)
    if len(groups) < 2:
        raise LlmkitError(f"the pairs ask {len(groups)} distinct prompt(s): nothing to hold out", "add pairs, or pass --val-data FILE")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    cut = max(1, round(len(keys) * val_fraction))
    return [r for k in keys[cut:] for r in groups[k]], [r for k in keys[:cut] for r in groups[k]]


def glue_examples(cfg: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    """A GLUE/SuperGLUE task's training and validation rows from its official files (the validation file beside the
    training one, or --val-data)."""
    if not cfg.data:
        raise LlmkitError(f"--glue {cfg.glue} needs --data: the task's official file or folder", "e.g. --data glue_data/SST-2/train.tsv")
    task = glue.get_task(cfg.glue)
    if task.name in ("axb", "axg"):
        raise LlmkitError(
            f"{task.folder} is a diagnostic set with no training data (its one file is the test)",
            "fine-tune on RTE (--glue rte-superglue --data superglue_data/RTE), then `llmkit eval glue --task "
            f"{task.name} --model RUN --data superglue_data`",
        )
    train_file = glue.task_file(task, cfg.data, "train")
    val_file = Path(cfg.val_data) if cfg.val_data else glue.task_file(task, train_file.parent, "validation")

    def examples(path) -> list[Example]:
        return [
            Example(
                text=r.text,
                text_pair=r.text_pair,
                label=r.label if task.kind == "regression" else str(r.label),
                task=task.name,
                meta={"group": r.group, "gold": r.gold, "candidate": r.candidate, "pair_id": r.pair_id},
            )
            for r in glue.read_rows(task, path)
        ]

    return examples(train_file), examples(val_file)


def label_kind(examples: list[Example], regression: bool = False) -> str:
    """ "regression" when every label is a number and some are not whole (3.5), or when asked for (--regression);
    else "classification", every label then a class name ("4" for 4). Labels are made so in place."""
    numeric = all(isinstance(ex.label, (int, float)) and not isinstance(ex.label, bool) for ex in examples)
    if regression and not numeric:
        bad = next(ex.label for ex in examples if not isinstance(ex.label, (int, float)) or isinstance(ex.label, bool))
        raise LlmkitError(f"--regression needs a number as every label; one is {bad!r}", "give numeric labels, or leave out --regression")
    regression = regression or (numeric and any(float(ex.label) != int(ex.label) for ex in examples))
    for ex in examples:
        ex.label = (
            float(ex.label)
            if regression
            else (str(int(ex.label)) if isinstance(ex.label, float) and ex.label.is_integer() else str(ex.label))
        )
    return "regression" if regression else "classification"


def load_examples(cfg: FinetuneConfig, log=print, rows: list[dict] | None = None) -> tuple[list[Example], list[Example]]:
    """Training and validation examples: a GLUE task's files, --data's rows (`rows` when read already), a built-in task."""
    if cfg.glue:
        return glue_examples(cfg)
    if cfg.data:
        rows = rows if rows is not None else read_rows(cfg.data, warn=log)
        if cfg.val_data:
            return [to_example(r) for r in rows], [to_example(r) for r in read_rows(cfg.val_data, warn=log)]
        train, val = split_rows(rows, cfg.seed, log=log)
        return [to_example(r) for r in train], [to_example(r) for r in val]
    if cfg.task == "genre":
        genre_train, genre_val = T.genre_examples("train", cfg.seed), T.genre_examples("val", cfg.seed)
        return genre_train[: cfg.n_train], genre_val[: cfg.n_val]
    return T.mixture(cfg.task, cfg.n_train, "train", cfg.seed), T.mixture(cfg.eval_task or cfg.task, cfg.n_val, "val", cfg.seed)


def weights_method(cfg: FinetuneConfig) -> str:
    """What trains, as `apply_method` names it: "full", "lora" or "adapter" (qlora is LoRA on a 4-bit base; dpo and
    orpo train LoRA, or every weight with --full)."""
    if cfg.method == "qlora":
        return "lora"
    if cfg.method in ("dpo", "orpo"):
        return "full" if cfg.full else "lora"
    return cfg.method


def base_quantization(cfg: FinetuneConfig, device: torch.device) -> str | None:
    """The 4-bit form of a LoRA run's frozen base (QLoRA), or None: `--method qlora` or `--method lora --quantize
    int4|nf4|auto`; auto is nf4 on CUDA (bitsandbytes), llmkit's int4 kernel on a CPU."""
    asked = cfg.quantize if cfg.quantize != "none" else ("auto" if cfg.method == "qlora" else None)
    if asked is None:
        return None
    if asked == cfg.quantize and cfg.method == "qlora" and asked not in ("auto", "int4", "nf4"):
        raise LlmkitError(f"--method qlora takes --quantize auto, int4 or nf4, not {asked}", "leave out --quantize")
    if weights_method(cfg) != "lora":
        raise LlmkitError(
            f"--quantize {cfg.quantize} freezes a LoRA base in 4 bits; --method {cfg.method} trains the weights",
            "use --method lora or qlora",
        )
    if asked == "auto":
        return "nf4" if device.type == "cuda" else "int4"
    if asked not in FROZEN_4BIT:
        raise LlmkitError(f"--quantize {asked} is not a 4-bit base for fine-tuning", "use int4 (CPU), nf4 (CUDA) or auto")
    if (asked == "nf4") != (device.type == "cuda"):
        raise LlmkitError(f"--quantize {asked} does not run on {device.type}", "nf4 runs on CUDA, int4 on a CPU: use --quantize auto")
    return asked


def prepare_model(model, cfg: FinetuneConfig, log=print):
    four_bit = base_quantization(cfg, _device(model))  # (run() made cfg.quantize the resolved int4 / nf4 / none)
    if four_bit is not None:
        n = quantize_frozen(model, four_bit)
        log(f"      the frozen base in 4 bits ({four_bit}): {n} linear layers")
    options = {k: getattr(cfg, k) for k in METHOD_FIELDS}
    if cfg.method in ("dpo", "orpo"):
        options["lora_dropout"] = 0.0  # as trl's disable_dropout: the policy's log-probabilities against a clean reference
    apply_method(model, weights_method(cfg), **options)
    if four_bit is not None:
        check_peft_names(model)  # the adapter is saved apart: refused now, not after training
    model.checkpointing = cfg.checkpointing
    return model


# --- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer(model, tok, examples: list[Example], max_new_tokens: int, batch: int = 8) -> list[str]:
    """The model's greedy answers to `examples` (their messages before the answer)."""
    return greedy_answers(model, tok, [ex.messages[:-1] for ex in examples], max_new_tokens, batch)


@torch.no_grad()
def greedy_answers(model, tok, conversations: list[list[dict]], max_new_tokens: int, batch: int = 8) -> list[str]:
    """The model's greedy answer to each conversation, through the chat template, `batch` at a time."""
    model.eval()
    prompts = [chat_prompt_ids(tok, messages) for messages in conversations]
    out: list[str] = []
    with progress("answers") as bar:  # minutes on a CPU for a few hundred questions: a bar with rate and ETA
        task = bar.add_task("greedy answers", total=len(prompts))
        for i in range(0, len(prompts), batch):
            config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
            out += [g.text for g in generate(model, tok, prompts[i : i + batch], config, warn=lambda m: None)]
            bar.update(task, completed=len(out))
    return out


@torch.no_grad()
def answer_loss(model, tok, examples: list[Example], cfg: FinetuneConfig, batch: int = 8) -> float:
    """Mean cross-entropy (nats/token) on the answer tokens of `examples`, teacher-forced."""
    model.eval()
    prep = prepare_examples(tok, examples, min(cfg.max_len, model.config.max_seq_len), truncate=True)
    nats, count = 0.0, 0
    for i in range(0, len(prep.ids), batch):
        x, y, mask = collate(prep.ids[i : i + batch], prep.labels[i : i + batch], tok.pad_id or 0, _device(model))
        logits = model(x, attention_mask=mask)[:, :-1]
        nats += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((y[:, 1:] != IGNORE).sum())
    return nats / max(count, 1)


def exact_match(predictions: list[str], examples: list[Example]) -> float:
    hits = [T.normalize_answer(p) == T.normalize_answer(ex.answer) for p, ex in zip(predictions, examples)]
    return sum(hits) / max(len(hits), 1)


@torch.no_grad()
def general_bits_per_byte(model, tok, cfg: FinetuneConfig) -> float:
    model.eval()
    text = read_source(cfg.general_text).texts[0]
    window = min(256, model.config.max_seq_len)
    return evaluate_text(model, tok, text, window, batch_size=4, max_tokens=cfg.general_tokens)["bits_per_byte"]


def classifier_metrics(model, tok, examples: list[Example], cfg: FinetuneConfig) -> dict:
    """The task's official metrics for a GLUE/SuperGLUE task, else accuracy, macro-F1 and ROC-AUC (Pearson and Spearman
    for regression)."""
    if not cfg.glue:
        return classification_scores(model, tok, examples)
    return glue_scores(model, tok, examples, cfg.glue)


def classification_scores(model: Classifier, tok, examples) -> dict:
    """Accuracy, macro-F1 and ROC-AUC (or Pearson and Spearman for regression) on `examples`."""
    p = predict(model, tok, examples).numpy()
    if model.regression:
        ex = Examples(p.tolist(), labels=[float(e.label) for e in examples])
        return {"pearson": metric_value("pearson", ex), "spearman": metric_value("spearman", ex)}
    labels = [model.labels[i] for i in p.argmax(-1)]
    ex = Examples(labels, labels=[e.label for e in examples], scores=p.tolist())
    out = {"accuracy": metric_value("accuracy", ex), "macro_f1": metric_value("f1_macro", ex)}
    try:
        present = sorted({e.label for e in examples})
        if len(present) == len(model.labels):
            out["roc_auc"] = metric_value("roc_auc", ex)
        else:
            out["roc_auc"] = float("nan")  # a class absent from the validation set
    except (ValueError, LlmkitError):
        out["roc_auc"] = float("nan")
    return out


def glue_scores(model, tok, examples: list[Example], task_name: str) -> dict:
    rows = [glue.Row(ex.text, ex.text_pair, ex.label, **ex.meta) for ex in examples]
    return glue.evaluate_classifier(model, tok, glue.get_task(task_name), rows)


def _embeddings(encoder, tok, texts: list[str]) -> torch.Tensor:
    ids = [tok.encode(t, max_length=128) for t in texts]
    x, _, mask = collate(ids, ids, tok.pad_id or 0, _device(encoder))
    with torch.no_grad():
        return encoder.embed_sentences(x, mask)


# --- the recipe ------------------------------------------------------------------------------------------------------


class Finetuning:
    """The recipe as its seven printed phases over one run's state: `run()` calls them in order, each timed (the seconds
    go to results.json's "phases")."""

    PHASES = ("load data", "preprocess", "prepare model", "initial predictions", "train", "evaluate", "predict")

    def __init__(self, cfg: FinetuneConfig, *, log=print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.out)
        self.phases: dict[str, float] = {}  # each phase's seconds (benchmarks/first_run.py reads them)

    def run(self) -> dict:
        cfg = self.cfg
        self.d = init_distributed()  # one process, or a rank of torchrun (DDP / FSDP2 in `train`)
        if not self.d.main:
            self.log = lambda message: None  # rank 0 speaks and writes for all
        _check_options(cfg)  # contradictory options are refused before anything loads
        if self.d.world > 1 and cfg.fsdp and cfg.method != "full":
            raise LlmkitError("--fsdp shards full fine-tuning (--method full); other methods run under DDP", "leave out --fsdp (DDP)")
        if self.d.world > 1 and cfg.fsdp and cfg.resume:
            raise LlmkitError("an FSDP fine-tune does not resume yet", "resume it without --fsdp (DDP), or start a new --out")
        device = self.d.device if self.d.world > 1 else resolve_device(cfg.device)
        self.cfg = cfg = dataclasses.replace(cfg, quantize=base_quantization(cfg, device) or "none")  # refused now, not after loading
        self.ckpt = resume_point(self.run_dir, cfg.resume)
        if cfg.budget is None:  # a resumed run keeps its own budget; a new one takes the default
            saved = self.run_dir / "finetune_config.json"
            own = io.read_json(saved).get("budget") if self.ckpt is not None and saved.exists() else None
            self.cfg = cfg = dataclasses.replace(cfg, budget=own or DEFAULT_BUDGET)
        self.budget = Budget.parse(cfg.budget or DEFAULT_BUDGET)  # a budget that does not parse is refused before anything runs
        if self.ckpt is not None:
            _check_resume(self.ckpt, io.read_json(self.ckpt / "state.json"), cfg)  # before the run's config is rewritten
            self._refuse_finished()
        torch.manual_seed(cfg.seed)
        if self.d.main:
            io.write_json(self.run_dir / "finetune_config.json", dataclasses.asdict(cfg))  # what `load_classifier` and --resume read
        steps = (
            self.load_data,
            self.preprocess,
            self.prepare_model,
            self.initial_predictions,
            self.train,
            self.evaluate,
            self.predict,
        )
        for number, (name, step) in enumerate(zip(self.PHASES, steps), 1):
            self.log(f"[{number}/7] {name}" + (f": {cfg.method}" if name == "prepare model" else ""))
            started = time.perf_counter()
            step()
            key = f"{name}: {cfg.method}" if name == "prepare model" else name
            self.phases[key] = round(time.perf_counter() - started, 2)
            self.log(f"      ({self.phases[key]:.1f} s)")
        return self.results()

    def _refuse_finished(self) -> None:
        """A run that finished (results.json written at its last checkpoint's step) resumes only with a new budget."""
        results = self.run_dir / "results.json"
        state = io.read_json(self.ckpt / "state.json")  # type: ignore[operator]
        if not results.exists() or io.read_json(results).get("steps") != state.get("step"):
            return  # killed before its end: it resumes
        before = state.get("config", {}).get("budget")
        if self.budget.exhausted(state["step"], state.get("tokens", 0), state["elapsed"]):
            raise LlmkitError(
                f"the run in {self.run_dir} is finished ({state['step']} steps, results.json written): nothing is left to resume",
                f"give a larger --budget than its {before} to train it further, or start a new --out",
            )
        self.log(f"extending the finished run in {self.run_dir}: budget {before} -> {self.cfg.budget}")

    def load_data(self) -> None:
        cfg = self.cfg
        rows = read_rows(cfg.data, warn=self.log) if cfg.data and not cfg.glue else None  # read once, whatever they hold
        self.preference = cfg.method in ("dpo", "orpo")
        if self.preference or (rows and is_pair_row(rows[0])):
            self.train_ex, self.val_ex = self._load_pairs(rows)
            self.classification = False
            return
        self.train_ex, self.val_ex = load_examples(cfg, self.log, rows)
        self.classification = self.train_ex[0].text is not None
        self.log(f"      {len(self.train_ex)} training and {len(self.val_ex)} validation examples ({cfg.data or cfg.task})")

    def _load_pairs(self, rows: list[dict] | None) -> tuple[list, list]:
        """Preference pairs of --data: split after deduplication (seeded, disjoint), bad rows counted and left out."""
        cfg = self.cfg
        if not self.preference:
            raise LlmkitError(f"{cfg.data} holds preference pairs (chosen/rejected)", "train on them with --method dpo or orpo")
        if not cfg.data:
            raise LlmkitError(
                f"--method {cfg.method} learns from preference pairs: give --data pairs.jsonl",
                "rows of prompt/chosen/rejected, e.g. from `llmkit eval arena --export-pairs pairs.jsonl`",
            )
        assert rows is not None  # --data was read by load_data
        if cfg.val_data:
            train_rows, val_rows = rows, read_rows(cfg.val_data, warn=self.log)
        else:
            train_rows, val_rows = split_pairs_by_prompt(rows, cfg.seed, log=self.log)
        (train, skipped), (val, val_skipped) = read_pairs(train_rows), read_pairs(val_rows)
        held_out = {_json_key(p.prompt) for p in val}
        if cfg.val_data and any(_json_key(p.prompt) in held_out for p in train):
            before = len(train)
            train = [p for p in train if _json_key(p.prompt) not in held_out]
            self.log(f"      {before - len(train)} training pair(s) dropped: their prompt is in --val-data")
        for kind, n in {k: skipped.get(k, 0) + val_skipped.get(k, 0) for k in {**skipped, **val_skipped}}.items():
            self.log(f"      {n} row(s) left out: {kind}")
        if not train or not val:
            raise LlmkitError(
                f"{cfg.data} leaves {len(train)} training and {len(val)} validation pairs",
                "give rows with a prompt and two different, non-empty answers (chosen, rejected)",
            )
        self.log(f"      {len(train)} training and {len(val)} validation pairs ({cfg.data})")
        return train, val

    def preprocess(self) -> None:
        """Classification rows as ids and token types with label indices; chat rows through the template, loss on the
        answers (packed or not); preference pairs as two rows each, the loss mask on their answers."""
        cfg = self.cfg
        self.model = model = load_model(cfg.model, device=self.d.device if self.d.world > 1 else cfg.device)
        self.tok = tok = model.tokenizer
        if self.preference:
            if model.config.family != "decoder":
                raise LlmkitError("preference pairs train a decoder", "use --model smollm2 or a decoder you trained")
            limit = min(cfg.max_len, model.config.max_seq_len)
            self.pairs, self.val_pairs = encode_pairs(tok, self.train_ex, limit), encode_pairs(tok, self.val_ex, limit)
            dropped = self.pairs.too_long + self.val_pairs.too_long
            self.log(
                f"      {len(self.pairs.chosen)} + {len(self.val_pairs.chosen)} pairs encoded; "
                f"{dropped} left out for the length limit of {limit}"
            )
            if not self.pairs.chosen or not self.val_pairs.chosen:
                raise LlmkitError(f"no pair fits --max-len {cfg.max_len} on both sides", "raise --max-len")
            return
        if self.classification:
            if model.config.family != "encoder":
                raise LlmkitError("classification data needs an encoder model", "use --model minilm (or another encoder)")
            asked = cfg.regression or bool(cfg.glue and glue.get_task(cfg.glue).kind == "regression")
            both = self.train_ex + self.val_ex
            regression = label_kind(both, asked) == "regression"
            self.labels = [REGRESSION] if regression else sorted({ex.label for ex in both})  # a label seen only in validation too
            self.train_ids, self.train_types = encode_rows(tok, self.train_ex, model.config.max_seq_len)
            self.train_y = [ex.label for ex in self.train_ex] if regression else [self.labels.index(ex.label) for ex in self.train_ex]
            pairs = sum(ex.text_pair is not None for ex in self.train_ex)
            self.log(
                f"      {'regression' if regression else f'{len(self.labels)} labels: ' + ', '.join(self.labels)}"
                + (f"; {pairs} sentence pairs" if pairs else "")
            )
            return
        if model.config.family != "decoder":
            raise LlmkitError("instruction data needs a decoder model", "use --model smollm2 or a decoder you trained")
        self.prep = prep = prepare_examples(
            tok,
            self.train_ex,
            min(cfg.max_len, model.config.max_seq_len),
            train_on_prompt=cfg.train_on_prompt,
            truncate=cfg.truncate,
            pack=cfg.pack,
        )
        n_tokens = sum(map(len, prep.ids))
        n_answer = sum(sum(1 for t in y if t != IGNORE) for y in prep.labels)
        self.log(
            f"      {len(prep.ids)} sequences, {n_tokens:,} tokens, {n_answer:,} with loss; "
            f"{prep.dropped} dropped and {prep.truncated} truncated for the length limit of {cfg.max_len}"
        )

    def prepare_model(self) -> None:
        cfg = self.cfg
        if self.classification:
            self.before_emb = _embeddings(self.model, self.tok, [ex.text for ex in self.val_ex[:32]])
            self.model = Classifier(self.model, self.labels)
            torch.manual_seed(cfg.seed)
            torch.nn.init.normal_(self.model.head.weight, std=0.02)
            torch.nn.init.zeros_(self.model.head.bias)
            prepare_model(self.model.encoder, cfg, self.log)
            for p in self.model.head.parameters():
                p.requires_grad_(True)
        else:
            if self.preference:
                import copy

                frozen = cfg.method == "dpo" and cfg.full  # LoRA's reference is its base with the adapters off: no copy
                reference = copy.deepcopy(self.model).requires_grad_(False).eval() if frozen else None
                self.loss_fn = PreferenceLoss("ipo" if cfg.loss == "ipo" else cfg.method, _beta(cfg), cfg.label_smoothing, reference)
            prepare_model(self.model, cfg, self.log)
        self.trainable, self.total = trainable_share(self.model)
        self.log(f"      {self.trainable:,} of {self.total:,} parameters trainable ({self.trainable / self.total:.2%})")

    def measure(self) -> dict:
        """The task metric; for decoders also the answers' loss, general text's bits per byte, the untrained tasks."""
        cfg, model, tok, val_ex = self.cfg, self.model, self.tok, self.val_ex
        out: dict[str, object]
        if self.classification:
            return classifier_metrics(model, tok, val_ex, cfg)
        if self.preference:
            out = {**self.preference_metrics(self.val_pairs), "general_bpb": general_bits_per_byte(model, tok, cfg)}
            if cfg.eval_task:  # pairs built from a task (`llmkit finetune pairs`): its held-out questions, answered greedily
                questions = T.mixture(cfg.eval_task, cfg.n_val, "val", cfg.seed)
                out["exact_match"] = exact_match(answer(model, tok, questions, cfg.max_new_tokens), questions)
            for t, exs in self.forget_sets.items():
                out[f"untrained_{t}"] = exact_match(answer(model, tok, exs, cfg.max_new_tokens), exs)
            shown = [Example(messages=[*p.prompt, {"role": "assistant", "content": p.chosen}], answer=p.chosen) for p in val_ex[: cfg.show]]
            out["_predictions"] = answer(model, tok, shown, cfg.max_new_tokens)
            return out
        preds = answer(model, tok, val_ex, cfg.max_new_tokens)
        out = {
            "exact_match": exact_match(preds, val_ex),
            "answer_loss": answer_loss(model, tok, val_ex, cfg),
            "general_bpb": general_bits_per_byte(model, tok, cfg),
        }
        for t, exs in self.forget_sets.items():
            out[f"untrained_{t}"] = exact_match(answer(model, tok, exs, cfg.max_new_tokens), exs)
        out["_predictions"] = preds[: cfg.show]
        return out

    @torch.no_grad()
    def preference_metrics(self, encoded, batch: int = 8) -> dict:
        """The preference loss and trl's reward metrics, averaged over `encoded`'s pairs (validation)."""
        model, sums, total = self.model, {}, 0.0
        model.eval()
        amp = autocast_dtype(self.cfg.precision, _device(model))
        for i in range(0, len(encoded.chosen), batch):
            rows = list(range(i, min(i + batch, len(encoded.chosen))))
            x, mask, y = pair_batch(encoded, rows, self.tok.pad_id or 0, _device(model))
            with torch.autocast(_device(model).type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = self.loss_fn(model, x, mask, y)
            total += loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        n = len(encoded.chosen)
        return {"loss": total / n, **{k: v / n for k, v in sums.items()}}

    def initial_predictions(self) -> None:
        cfg = self.cfg
        # pairs train no built-in task, except the one they were made from (--eval-task): every other one listed is measured
        trained = (cfg.eval_task or "") if self.preference else cfg.task
        asked = [t for t in cfg.forgetting_tasks.split(",") if t and t != "none"]  # "none": no task measured
        untrained = [t for t in asked if t not in trained] if not self.classification else []
        self.forget_sets = {t: T.task_examples(t, cfg.n_forgetting, "val", cfg.seed + 7) for t in untrained}
        saved = self.run_dir / "before.json"
        self.before = self.measure() if not (self.ckpt and saved.exists()) else io.read_json(saved)
        if self.d.main:
            io.write_json(saved, self.before)
        _log_metrics(self.log, "before", self.before)
        self._show(self.before)

    def _show(self, measured: dict) -> None:
        if self.preference:
            for p, got in zip(self.val_ex[: self.cfg.show], measured["_predictions"]):
                self.log(f"      Q: {p.prompt[-1]['content'][:90]!r}\n      chosen {p.chosen[:60]!r}, got {got.strip()[:60]!r}")
            return
        if not self.classification:
            for ex, p in zip(self.val_ex[: self.cfg.show], measured["_predictions"]):
                self.log(f"      Q: {ex.messages[-2]['content'][:90]!r}\n      expected {ex.answer!r}, got {p.strip()[:60]!r}")

    def train(self) -> None:
        """AdamW over the trainable parameters, warmup then cosine to a tenth, every target token of a step weighing the
        same (`accumulate_gradients`), clipped at 1.0; checkpoints every --save-every steps and at the end."""
        cfg, model = self.cfg, self.model
        budget = self.budget
        device = next(model.parameters()).device
        d = self.d if self.d.world > 1 else Dist(device=device)  # one process: wherever --device put the model
        amp = autocast_dtype(cfg.precision, device)
        self.train_model = self._parallel(model)  # DDP or FSDP2 under torchrun; the model itself for one process
        self.params = params = [p for p in model.parameters() if p.requires_grad]  # after FSDP2 replaced them
        lr = cfg.lr or DEFAULT_LR.get(cfg.method + ("-full" if cfg.full and self.preference else ""), 1e-4)
        self.optimizer = optimizer = make_adamw(params, lr, cfg.weight_decay, cfg.optim, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # float16 needs loss scaling
        self.step, self.tokens_seen, elapsed_before, self.warm_progress = 0, 0, 0.0, None
        if self.ckpt is not None:
            elapsed_before = self._resume()
        metrics = self.metrics = Metrics(self.run_dir, d.main, self.step if self.ckpt is not None else None)  # keeps what was logged
        schedule = dataclasses.make_dataclass("Schedule", ["lr", "warmup", "min_lr_ratio"])(lr, cfg.warmup, 0.1)
        model.train()
        start = time.perf_counter()
        self.losses: list[float] = []
        with progress("steps", disable=None if self.d.main else True) as bar:
            task = bar.add_task("finetune", total=budget.steps or budget.tokens or budget.seconds or 1)
            while True:
                # one clock: the slowest rank's, so every rank stops at the same step (one process: its own)
                elapsed = all_reduce([elapsed_before + time.perf_counter() - start], d, op="max")[0]
                if budget.exhausted(self.step, self.tokens_seen, elapsed):
                    break
                progress_now = budget.progress(self.step, self.tokens_seen, elapsed)
                if self.step >= cfg.warmup and self.warm_progress is None:
                    exact = not (budget.tokens or budget.seconds)
                    self.warm_progress = cfg.warmup / budget.steps if budget.steps and exact else progress_now
                cur_lr = learning_rate(schedule, self.step, progress_now, self.warm_progress or 0.0)  # warmup, then cosine to a tenth
                for g in optimizer.param_groups:
                    g["lr"] = cur_lr
                micro = [self.micro_batch(self.step, m) for m in range(cfg.grad_accum)]
                self.step_metrics: dict[str, float] = {}  # preference methods: trl's reward metrics, summed over the pairs
                loss_sum, n_targets = accumulate_gradients(
                    self.train_model, micro, lambda m: self.summed_loss(m[0], m[1]), [m[2] for m in micro], d, amp, scaler, cfg.fsdp
                )  # every target token of the step, on every rank, weighs the same
                loss_sum, step_tokens = all_reduce([loss_sum, float(sum(m[3] for m in micro))], d)  # every rank's
                total_loss = loss_sum / max(n_targets, 1)
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += int(step_tokens)
                self.losses.append(total_loss)
                row = {"step": self.step, "split": "train", "loss": total_loss, "lr": cur_lr, "tokens": self.tokens_seen}
                if self.step_metrics:
                    names = sorted(self.step_metrics)
                    summed = all_reduce([self.step_metrics[k] for k in names], d)
                    row.update({k: v / max(n_targets, 1) for k, v in zip(names, summed)})
                metrics.log(row)
                done = self.step if budget.steps else (self.tokens_seen if budget.tokens else elapsed)
                bar.update(task, completed=done, description=f"loss {total_loss:.3f}")
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.checkpoint(elapsed_before + time.perf_counter() - start)
        self.elapsed = elapsed_before + time.perf_counter() - start
        self.checkpoint(self.elapsed)
        if d.world > 1 and cfg.fsdp:  # (fully_shard changes the model in place: train_model is model)
            self.model = self._gathered()  # evaluation and saving use the whole model on every rank

    def _resume(self) -> float:
        """The trainable weights, optimizer, generators and counters of the checkpoint; returns its elapsed seconds."""
        cfg, model = self.cfg, self.model
        names = {id(p): n for n, p in model.named_parameters()}
        model_state, opt_state, state = load_checkpoint(self.ckpt)
        _check_resume(self.ckpt, state, cfg, {names[id(p)]: tuple(p.shape) for p in self.params}, model_state)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in model_state:
                    p.copy_(model_state[n])
        self.optimizer.load_state_dict(opt_state)
        set_rng_states(state["rng"], log=self.log)
        self.step = state["step"]
        self.tokens_seen = state.get("tokens", 0)
        self.warm_progress = state.get("warm_progress", 0.0 if self.step > cfg.warmup else None)  # older ones: cosine from 0
        self.log(f"      resumed at step {self.step}")
        return state["elapsed"]

    def _parallel(self, model):
        """The model training runs through: DDP (every rank a whole copy, gradients averaged) or FSDP2 (full
        fine-tuning's weights, gradients and optimizer states sharded per block) under torchrun; else the model."""
        d = self.d
        if d.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            inner = model.encoder if isinstance(model, Classifier) else model
            for block in getattr(inner, "blocks", []) or []:
                fully_shard(block)
            return fully_shard(model)
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # the frozen buffers (a QLoRA base's 4-bit codes) are the same on every rank: never re-sent before a forward
        new_name = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters  # torch >= 2.13's name
        no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, **no_sync)

    def _gathered(self):
        """After FSDP2 training: a plain copy of the model (a classifier's head and encoder too) with the whole trained
        weights, on every rank; the shards and the optimizer's states are let go first."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))  # every rank's (cpu_offload: rank 0's only)
        self.train_model = self.optimizer = None
        self.params = []
        plain = load_model(self.cfg.model, device=self.d.device)
        if self.classification:
            plain = Classifier(plain, self.labels)
            prepare_model(plain.encoder, self.cfg, log=lambda m: None)
        else:
            prepare_model(plain, self.cfg, log=lambda m: None)
        plain.load_state_dict({k: v.to(self.d.device) for k, v in full.items()}, strict=True)
        return plain

    def checkpoint(self, elapsed: float) -> None:
        if self.cfg.fsdp and self.d.world > 1:
            return  # an FSDP fine-tune does not resume (yet): its weights are saved whole at the end
        if not self.d.main:
            barrier(self.d)
            return
        names = {id(p): n for n, p in self.model.named_parameters()}
        save_checkpoint(
            self.run_dir,
            model_state={names[id(p)]: p.detach() for p in self.params},
            optimizer_state=self.optimizer.state_dict(),
            state={
                "step": self.step,
                "elapsed": elapsed,
                "tokens": self.tokens_seen,
                "warm_progress": self.warm_progress,
                "config": dataclasses.asdict(self.cfg),
            },
        )
        barrier(self.d)  # no rank goes on (or stops) before the checkpoint is whole

    def micro_batch(self, step: int, micro: int):
        """(forward inputs, targets, count of targets, tokens) of one micro-batch. A step draws batch_size x grad_accum
        x ranks rows from (seed, step) and micro-step m of rank r takes the (r·grad_accum + m)-th slice: batch 8 x 1,
        batch 4 x 2 and 2 ranks x batch 4 see the same rows."""
        cfg, pad, device = self.cfg, self.tok.pad_id or 0, _device(self.model)
        n_rows = len(self.train_ids) if self.classification else (len(self.pairs.chosen) if self.preference else len(self.prep.ids))
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drawn = torch.randint(0, n_rows, (cfg.batch_size * cfg.grad_accum * self.d.world,), generator=g, device="cpu").tolist()
        part = self.d.rank * cfg.grad_accum + micro
        rows = drawn[part * cfg.batch_size : (part + 1) * cfg.batch_size]
        if self.preference:  # each row a pair: its chosen and its rejected answer, one loss per pair
            x, mask, y = pair_batch(self.pairs, rows, pad, device)
            return (x, mask, None), y, len(rows), int(mask.sum())
        if self.classification:
            x, mask, types = batch_tensors([self.train_ids[r] for r in rows], [self.train_types[r] for r in rows], pad, device)
            return (x, mask, types), torch.tensor([self.train_y[r] for r in rows], device=device), len(rows), int(mask.sum())
        prep = self.prep
        if prep.segments is not None:  # packed: attention stays inside each example, positions restart
            x, y, mask, positions = collate_packed(
                [prep.ids[r] for r in rows], [prep.labels[r] for r in rows], [prep.segments[r] for r in rows], pad, device
            )
            return (x, mask, positions), y[:, 1:], int((y[:, 1:] != IGNORE).sum()), sum(len(prep.ids[r]) for r in rows)
        x, y, mask = collate([prep.ids[r] for r in rows], [prep.labels[r] for r in rows], pad, device)
        return (x, mask, None), y[:, 1:], int((y[:, 1:] != IGNORE).sum()), int(mask.sum())

    def summed_loss(self, inputs, targets) -> torch.Tensor:
        model = self.train_model  # through DDP's or FSDP2's wrapper under torchrun: its hooks sync the gradients
        if self.preference:
            loss, metrics = self.loss_fn(self.model, inputs[0], inputs[1], targets, forward=model)
            for k, v in metrics.items():
                self.step_metrics[k] = self.step_metrics.get(k, 0.0) + v
            return loss
        if self.classification:
            return self.model.loss(model(*inputs), targets)  # type: ignore[operator]  # a classifier head's own loss (an attribute)
        x, mask, positions = inputs
        logits = model(x, attention_mask=mask, position_ids=positions)[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    def evaluate(self) -> None:
        self.after = self.measure()
        if self.preference:  # the validation values beside the training rows, as trl logs them (eval_ dropped)
            self.metrics.log({"step": self.step, "split": "val", **{k: v for k, v in self.after.items() if not k.startswith("_")}})
        if self.classification:
            now = _embeddings(self.model.encoder, self.tok, [ex.text for ex in self.val_ex[:32]])
            self.after["embedding_drift_cosine"] = float(F.cosine_similarity(self.before_emb, now, dim=-1).mean())
        _log_metrics(self.log, "after", self.after)

    def predict(self) -> None:
        self._show(self.after)
        self.saved = _save(self.model, self.tok, self.cfg, self.run_dir) if self.d.main else ""
        barrier(self.d)

    def results(self) -> dict:
        """results.json, the loss plot, and the line that says where the run is."""
        cfg = self.cfg
        result = {
            "model": cfg.model,
            "method": cfg.method,
            "task": cfg.data or cfg.task,
            "steps": self.step,
            "seconds": round(self.elapsed, 1),
            "trainable": self.trainable,
            "parameters": self.total,
            "trainable_share": self.trainable / self.total,
            "peak_memory_mb": peak_memory_mb(),  # the process's resident memory
            **({"peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20} if _device(self.model).type == "cuda" else {}),
            "before": {k: v for k, v in self.before.items() if not k.startswith("_")},
            "after": {k: v for k, v in self.after.items() if not k.startswith("_")},
            "saved": self.saved,
            "final_loss": sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1) if self.losses else None,
            **(
                {"eval": {k: v for k, v in self.after.items() if k == "loss" or k.startswith(("rewards/", "logps/"))}}
                if self.preference
                else {}
            ),
            "phases": self.phases,
        }
        if self.d.main:
            io.write_json(self.run_dir / "results.json", result)
            self.metrics.plot(self.run_dir / "loss.png", title="fine-tuning loss")
        self.log(f"done: {self.saved} -> {self.run_dir}")
        if self.d.world > 1:
            import torch.distributed as dist

            barrier(self.d)
            dist.destroy_process_group()
        return result


def finetune(cfg: FinetuneConfig, *, log=print) -> dict:
    """Run the recipe (`Finetuning`: its seven phases); returns what results.json holds."""
    return Finetuning(cfg, log=log).run()


RESUME_KEYS = (
    "model",
    "method",
    "quantize",
    "loss",
    "beta",
    "label_smoothing",
    "full",
    "task",
    "eval_task",
    "data",
    "val_data",
    "n_train",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "rslora",
    "adapter_size",
    "max_len",
    "pack",
    "train_on_prompt",
    "truncate",
    "batch_size",
    "grad_accum",
    "seed",
    "glue",
    "regression",
)


def _check_resume(path, state: dict, cfg: FinetuneConfig, trainable: dict[str, tuple] | None = None, saved: dict | None = None) -> None:
    """Refuse to resume a checkpoint made by other options or (given the model's `trainable` shapes and the `saved`
    tensors) holding other trainable tensors (other LoRA targets, say), rather than continue with fresh weights where
    the saved ones do not fit."""
    was = state.get("config", {})
    changed = [f"{k}: {was.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS if k in was and was[k] != getattr(cfg, k)]
    missing: list[str] = []
    extra: list[str] = []
    shapes: list[str] = []
    if trainable is not None and saved is not None:
        missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        shapes = [n for n in trainable if n in saved and tuple(saved[n].shape) != trainable[n]]
    if changed or missing or extra or shapes:
        detail = "; ".join(
            filter(
                None,
                [
                    ", ".join(changed),
                    f"not in the checkpoint: {missing[:3]}" if missing else "",
                    f"not in this model: {extra[:3]}" if extra else "",
                    f"other shapes: {shapes[:3]}" if shapes else "",
                ],
            )
        )
        raise LlmkitError(
            f"the checkpoint in {path} was made by another fine-tuning run ({detail})",
            "resume with the options of the original run, or choose a new --out",
        )


def make_adamw(params, lr: float, weight_decay: float, optim: str, device: torch.device):
    """AdamW, its moments in float32 (torch) or in 8 bits (`adamw8bit`: bitsandbytes' block-wise quantized states, on
    CUDA: a quarter of the optimizer's memory)."""
    if optim == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optim != "adamw8bit":
        raise LlmkitError(f"unknown optimizer {optim!r}", "use --optim adamw or adamw8bit")
    if device.type != "cuda":
        raise LlmkitError(f"8-bit optimizer states (bitsandbytes) run on CUDA, not on {device.type}", "use --optim adamw here")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LlmkitError("--optim adamw8bit needs bitsandbytes", "pip install bitsandbytes, or use --optim adamw") from None
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _beta(cfg: FinetuneConfig) -> float:
    return 0.1 if cfg.beta is None else cfg.beta


def _check_options(cfg: FinetuneConfig) -> None:
    """Options that would be ignored or contradict each other, refused in one line before anything runs."""
    preference = cfg.method in ("dpo", "orpo")
    if cfg.full and cfg.method not in ("dpo", "orpo", "grpo"):
        raise LlmkitError(f"--full chooses full training for dpo, orpo and grpo; --method {cfg.method} is what it is", "leave out --full")
    if cfg.answer_tag and cfg.method != "grpo":
        raise LlmkitError("--answer-tag shapes GRPO's rewards", "use it with --method grpo")
    if cfg.loss != "sigmoid" and cfg.method != "dpo":
        raise LlmkitError(
            f"--loss {cfg.loss} is a DPO loss; --method {cfg.method} has its own", "use --method dpo --loss ipo, or leave out --loss"
        )
    if cfg.label_smoothing and not (cfg.method == "dpo" and cfg.loss == "sigmoid"):
        raise LlmkitError("--label-smoothing is conservative DPO's (the sigmoid loss)", "use it with --method dpo (no --loss ipo)")
    if preference:
        PreferenceLoss("ipo" if cfg.loss == "ipo" else cfg.method, _beta(cfg), cfg.label_smoothing)  # --beta, --label-smoothing
        used = [flag for flag, on in (("--pack", cfg.pack), ("--train-on-prompt", cfg.train_on_prompt), ("--truncate", cfg.truncate)) if on]
        if used:
            raise LlmkitError(f"{', '.join(used)} shape SFT rows; preference pairs are two whole answers", f"leave out {', '.join(used)}")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _log_metrics(log, when: str, m: dict) -> None:
    log("      " + when + ": " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("_")))


def peak_memory_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save(model, tok, cfg: FinetuneConfig, run: Path) -> str:
    if isinstance(model, Classifier):
        save_classifier(model, run)
        return "classifier.safetensors (trained weights) + labels.json + finetune_config.json"
    kind = weights_method(cfg)
    if kind == "lora" and (cfg.method == "qlora" or cfg.quantize != "none"):  # the adapter loads on the float base
        save_lora(model, run, base_model_name=cfg.model)
        return "adapter_config.json + adapter_model.safetensors (PEFT format; trained on a 4-bit base, loads on the float one)"
    if kind == "lora":
        try:
            save_lora(model, run, base_model_name=cfg.model)
            return "adapter_config.json + adapter_model.safetensors (PEFT format)"
        except LlmkitError:
            pass
        merge_and_unwrap(model)
        save_model(model, run, tokenizer=tok)
        return "model.safetensors (LoRA merged: no PEFT names for this architecture)"
    if kind == "full":
        save_model(model, run, tokenizer=tok)
        return "model.safetensors + config.json + tokenizer"
    from safetensors.torch import save

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with io.atomic_open(run / "adapters.safetensors", "wb") as f:
        f.write(save(state))
    return "adapters.safetensors (bottleneck adapters)"
