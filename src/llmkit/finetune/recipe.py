"""`llmkit finetune`: the fine-tuning recipe, its steps printed as it goes.

    1 load data          a built-in task (or a mixture, or a file): training and validation examples
    2 preprocess         render through the chat template, loss mask on the answers; count dropped / truncated rows
    3 prepare model      full fine-tuning, LoRA, or bottleneck adapters; the share of trainable parameters
    4 initial predictions the task metric, the forgetting measures and a few answers before training
    5 train              AdamW, warmup + cosine, gradient accumulation, bf16 autocast; checkpoints that resume exactly
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
from llmkit.data import tasks as T
from llmkit.errors import LlmkitError
from llmkit.evaluate.metrics import Examples, metric_value
from llmkit.finetune.data import IGNORE, Example, collate, collate_packed, prepare_examples, read_rows, to_example
from llmkit.model.classifier import REGRESSION, Classifier, batch_tensors, encode_rows, predict, save_classifier
from llmkit.model.lora import METHOD_FIELDS, apply_method
from llmkit.model.weights import load as load_model

DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "adapter": 1e-3}


@dataclass
class FinetuneConfig:
    model: str = "smollm2"
    method: str = "lora"  # full | lora | adapter
    task: str = "arithmetic"  # a built-in task, a mixture 'arithmetic:2,reverse:1', or genre (encoders)
    eval_task: str | None = None  # evaluate on this task (default: the training task or mixture)
    data: str | None = None  # a file of rows instead of a built-in task (or, with glue, the task's official file or folder)
    glue: str | None = None  # a GLUE/SuperGLUE task: read --data in its official layout, score with its official metrics
    regression: bool = False  # numeric labels are scores to predict (default: only when some are not whole numbers)
    val_data: str | None = None
    n_train: int = 400
    n_val: int = 48
    budget: str = "100steps"
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
    import json
    import random

    unique = list({json.dumps(r, sort_keys=True, ensure_ascii=False): r for r in rows}.values())
    if len(unique) < len(rows) and log is not None:
        log(f"      {len(rows) - len(unique)} duplicate row(s) dropped before the split")
    if len(unique) < 2:
        raise LlmkitError(
            f"the data has {len(unique)} distinct row(s): nothing to hold out for validation", "add rows, or pass --val-data FILE"
        )
    random.Random(seed).shuffle(unique)
    cut = max(1, round(len(unique) * val_fraction))
    return unique[cut:], unique[:cut]


def glue_examples(cfg: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    """A GLUE/SuperGLUE task's training and validation rows from its official files (the validation file beside the
    training one, or --val-data)."""
    from pathlib import Path

    from llmkit.evaluate import glue

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


def load_examples(cfg: FinetuneConfig, log=print) -> tuple[list[Example], list[Example]]:
    if cfg.glue:
        return glue_examples(cfg)
    if cfg.data:
        rows = read_rows(cfg.data, warn=log)
        if cfg.val_data:
            return [to_example(r) for r in rows], [to_example(r) for r in read_rows(cfg.val_data, warn=log)]
        train, val = split_rows(rows, cfg.seed, log=log)
        return [to_example(r) for r in train], [to_example(r) for r in val]
    if cfg.task == "genre":
        genre_train, genre_val = T.genre_examples("train", cfg.seed), T.genre_examples("val", cfg.seed)
        return genre_train[: cfg.n_train], genre_val[: cfg.n_val]
    return T.mixture(cfg.task, cfg.n_train, "train", cfg.seed), T.mixture(cfg.eval_task or cfg.task, cfg.n_val, "val", cfg.seed)


def prepare_model(model, cfg: FinetuneConfig):
    return apply_method(model, cfg.method, **{k: getattr(cfg, k) for k in METHOD_FIELDS})


# --- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer(model, tok, examples: list[Example], max_new_tokens: int, batch: int = 8) -> list[str]:
    from llmkit.chat import chat_prompt_ids
    from llmkit.generate import GenerationConfig, generate

    model.eval()
    prompts = [chat_prompt_ids(tok, ex.messages[:-1]) for ex in examples]
    out = []
    for i in range(0, len(prompts), batch):
        out += [
            g.text
            for g in generate(
                model, tok, prompts[i : i + batch], GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False), warn=lambda m: None
            )
        ]
    return out


@torch.no_grad()
def answer_loss(model, tok, examples: list[Example], cfg: FinetuneConfig, batch: int = 8) -> float:
    """Mean cross-entropy (nats/token) on the answer tokens of `examples`, teacher-forced."""
    model.eval()
    prep = prepare_examples(tok, examples, min(cfg.max_len, model.config.max_seq_len), truncate=True)
    nats, count = 0.0, 0
    for i in range(0, len(prep.ids), batch):
        x, y, mask = collate(prep.ids[i : i + batch], prep.labels[i : i + batch], tok.pad_id or 0)
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
    from llmkit.data.sources import read_source
    from llmkit.evaluate.perplexity import evaluate_text

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
    from llmkit.evaluate import glue

    rows = [glue.Row(ex.text, ex.text_pair, ex.label, **ex.meta) for ex in examples]
    return glue.evaluate_classifier(model, tok, glue.get_task(task_name), rows)


def _embeddings(encoder, tok, texts: list[str]) -> torch.Tensor:
    ids = [tok.encode(t, max_length=128) for t in texts]
    x, _, mask = collate(ids, ids, tok.pad_id or 0)
    with torch.no_grad():
        return encoder.embed_sentences(x, mask)


# --- the recipe ------------------------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig, *, log=print) -> dict:
    from llmkit.model.lora import trainable_share
    from llmkit.progress import progress
    from llmkit.train.checkpoint import load_checkpoint, resume_point, save_checkpoint, set_rng_states
    from llmkit.train.pretrain import Budget, Dist, Metrics, accumulate_gradients, autocast_dtype, learning_rate

    run = Path(cfg.out)
    ckpt = resume_point(run, cfg.resume)
    torch.manual_seed(cfg.seed)
    lr = cfg.lr or DEFAULT_LR.get(cfg.method, 1e-4)
    budget = Budget.parse(cfg.budget)

    io.write_json(run / "finetune_config.json", dataclasses.asdict(cfg))  # what `load_classifier` and `--resume` read back
    phases: dict[str, float] = {}  # each phase's seconds, in results.json (benchmarks/first_run.py reads them)
    clock = [time.perf_counter(), ""]

    def phase(number: int, name: str) -> None:
        """Close the running phase (its time on the line after it) and open the next one."""
        now = time.perf_counter()
        if clock[1]:
            phases[str(clock[1])] = round(now - float(clock[0]), 2)
            log(f"      ({phases[str(clock[1])]:.1f} s)")
        clock[:] = [now, name]
        if number:
            log(f"[{number}/7] {name}")

    phase(1, "load data")
    train_ex, val_ex = load_examples(cfg, log)
    classification = train_ex[0].text is not None
    log(f"      {len(train_ex)} training and {len(val_ex)} validation examples ({cfg.data or cfg.task})")

    phase(2, "preprocess")
    model = load_model(cfg.model)
    tok = model.tokenizer
    if classification:
        if model.config.family != "encoder":
            raise LlmkitError("classification data needs an encoder model", "use --model minilm (or another encoder)")
        from llmkit.evaluate.glue import get_task

        asked = cfg.regression or bool(cfg.glue and get_task(cfg.glue).kind == "regression")
        regression = label_kind(train_ex + val_ex, asked) == "regression"
        # a label seen only in validation still gets an output
        labels = [REGRESSION] if regression else sorted({ex.label for ex in train_ex + val_ex})
        train_ids, train_types = encode_rows(tok, train_ex, model.config.max_seq_len)
        train_y = [ex.label for ex in train_ex] if regression else [labels.index(ex.label) for ex in train_ex]
        pairs = sum(ex.text_pair is not None for ex in train_ex)
        log(
            f"      {'regression' if regression else f'{len(labels)} labels: ' + ', '.join(labels)}"
            + (f"; {pairs} sentence pairs" if pairs else "")
        )
    else:
        if model.config.family != "decoder":
            raise LlmkitError("instruction data needs a decoder model", "use --model smollm2 or a decoder you trained")
        prep = prepare_examples(
            tok,
            train_ex,
            min(cfg.max_len, model.config.max_seq_len),
            train_on_prompt=cfg.train_on_prompt,
            truncate=cfg.truncate,
            pack=cfg.pack,
        )
        n_tokens = sum(map(len, prep.ids))
        n_answer = sum(sum(1 for t in y if t != IGNORE) for y in prep.labels)
        log(
            f"      {len(prep.ids)} sequences, {n_tokens:,} tokens, {n_answer:,} with loss; "
            f"{prep.dropped} dropped and {prep.truncated} truncated for the length limit of {cfg.max_len}"
        )

    phase(3, f"prepare model: {cfg.method}")
    if classification:
        before_emb = _embeddings(model, tok, [ex.text for ex in val_ex[:32]])
        model = Classifier(model, labels)
        torch.manual_seed(cfg.seed)
        torch.nn.init.normal_(model.head.weight, std=0.02)
        torch.nn.init.zeros_(model.head.bias)
        prepare_model(model.encoder, cfg)
        for p in model.head.parameters():
            p.requires_grad_(True)
    else:
        prepare_model(model, cfg)
    trainable, total = trainable_share(model)
    log(f"      {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")

    phase(4, "initial predictions")
    shown = val_ex[: cfg.show]
    forget_tasks = [t for t in cfg.forgetting_tasks.split(",") if t and t not in cfg.task] if not classification else []  # not trained on
    forget_sets = {t: T.task_examples(t, cfg.n_forgetting, "val", cfg.seed + 7) for t in forget_tasks}

    def measure() -> dict:
        if classification:
            return classifier_metrics(model, tok, val_ex, cfg)
        preds = answer(model, tok, val_ex, cfg.max_new_tokens)
        out: dict[str, object] = {
            "exact_match": exact_match(preds, val_ex),
            "answer_loss": answer_loss(model, tok, val_ex, cfg),
            "general_bpb": general_bits_per_byte(model, tok, cfg),
        }
        for t, exs in forget_sets.items():
            out[f"untrained_{t}"] = exact_match(answer(model, tok, exs, cfg.max_new_tokens), exs)
        out["_predictions"] = preds[: cfg.show]
        return out

    before = measure() if not (ckpt and (run / "before.json").exists()) else io.read_json(run / "before.json")
    io.write_json(run / "before.json", before)
    _log_metrics(log, "before", before)
    if not classification:
        for ex, p in zip(shown, before["_predictions"]):
            log(f"      Q: {ex.messages[-2]['content'][:90]!r}\n      expected {ex.answer!r}, got {p.strip()[:60]!r}")

    phase(5, "train")
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # float16 needs loss scaling
    names = {id(p): n for n, p in model.named_parameters()}
    step, tokens_seen, elapsed_before, warm_progress = 0, 0, 0.0, None
    if ckpt is not None:
        model_state, opt_state, state = load_checkpoint(ckpt)
        _check_resume(ckpt, state, cfg, {names[id(p)]: tuple(p.shape) for p in params}, model_state)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in model_state:
                    p.copy_(model_state[n])
        optimizer.load_state_dict(opt_state)
        set_rng_states(state["rng"], log=log)
        step, elapsed_before = state["step"], state["elapsed"]
        tokens_seen = state.get("tokens", 0)
        warm_progress = state.get("warm_progress", 0.0 if step > cfg.warmup else None)  # older checkpoints: cosine from 0
        log(f"      resumed at step {step}")
    n_rows = len(train_ids) if classification else len(prep.ids)
    metrics = Metrics(run, True, step if ckpt is not None else None)  # a resumed run keeps what was logged up to its checkpoint
    schedule = dataclasses.make_dataclass("Schedule", ["lr", "warmup", "min_lr_ratio"])(lr, cfg.warmup, 0.1)

    def checkpoint(elapsed):
        trainable_state = {names[id(p)]: p.detach() for p in params}
        save_checkpoint(
            run,
            model_state=trainable_state,
            optimizer_state=optimizer.state_dict(),
            state={
                "step": step,
                "elapsed": elapsed,
                "tokens": tokens_seen,
                "warm_progress": warm_progress,
                "config": dataclasses.asdict(cfg),
            },
        )

    def micro_batch(step: int, micro: int):
        """(forward inputs, targets, count of targets, tokens) of one micro-batch. A step draws batch_size x grad_accum
        rows from (seed, step) and micro-step m takes the m-th slice: batch 8 x 1 and batch 4 x 2 see the same rows."""
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drawn = torch.randint(0, n_rows, (cfg.batch_size * cfg.grad_accum,), generator=g).tolist()
        rows = drawn[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
        if classification:
            x, mask, types = batch_tensors([train_ids[r] for r in rows], [train_types[r] for r in rows], tok.pad_id or 0)
            return (x, mask, types), torch.tensor([train_y[r] for r in rows]), len(rows), int(mask.sum())
        if prep.segments is not None:  # packed: attention stays inside each example, positions restart
            x, y, mask, positions = collate_packed(
                [prep.ids[r] for r in rows], [prep.labels[r] for r in rows], [prep.segments[r] for r in rows], tok.pad_id or 0
            )
            return (x, mask, positions), y[:, 1:], int((y[:, 1:] != IGNORE).sum()), sum(len(prep.ids[r]) for r in rows)
        x, y, mask = collate([prep.ids[r] for r in rows], [prep.labels[r] for r in rows], tok.pad_id or 0)
        return (x, mask, None), y[:, 1:], int((y[:, 1:] != IGNORE).sum()), int(mask.sum())

    def summed_loss(inputs, targets) -> torch.Tensor:
        if classification:
            return model.loss(model(*inputs), targets)  # type: ignore[operator]  # a classifier head's own loss (an attribute)
        x, mask, positions = inputs
        logits = model(x, attention_mask=mask, position_ids=positions)[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    model.train()
    start = time.perf_counter()
    losses = []
    with progress("steps") as bar:
        task = bar.add_task("finetune", total=budget.steps or budget.tokens or budget.seconds or 1)
        while True:
            elapsed = elapsed_before + time.perf_counter() - start
            if budget.exhausted(step, tokens_seen, elapsed):
                break
            progress_now = budget.progress(step, tokens_seen, elapsed)
            if step >= cfg.warmup and warm_progress is None:
                warm_progress = cfg.warmup / budget.steps if budget.steps and not (budget.tokens or budget.seconds) else progress_now
            cur_lr = learning_rate(schedule, step, progress_now, warm_progress or 0.0)  # warmup, then cosine to a tenth
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            micro = [micro_batch(step, m) for m in range(cfg.grad_accum)]
            loss_sum, n_targets = accumulate_gradients(
                model, micro, lambda m: summed_loss(m[0], m[1]), [m[2] for m in micro], Dist(device=device), amp, scaler
            )  # every target token of the step weighs the same
            total_loss = loss_sum / max(n_targets, 1)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += sum(m[3] for m in micro)
            losses.append(total_loss)
            metrics.log({"step": step, "split": "train", "loss": total_loss, "lr": cur_lr, "tokens": tokens_seen})
            bar.update(
                task, completed=step if budget.steps else (tokens_seen if budget.tokens else elapsed), description=f"loss {total_loss:.3f}"
            )
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(elapsed_before + time.perf_counter() - start)
    elapsed = elapsed_before + time.perf_counter() - start
    checkpoint(elapsed)

    phase(6, "evaluate")
    after = measure()
    if classification:
        after["embedding_drift_cosine"] = float(
            torch.nn.functional.cosine_similarity(
                before_emb, _embeddings(model.encoder, tok, [ex.text for ex in val_ex[:32]]), dim=-1
            ).mean()
        )
    _log_metrics(log, "after", after)

    phase(7, "predict")
    if not classification:
        for ex, p in zip(shown, after["_predictions"]):
            log(f"      Q: {ex.messages[-2]['content'][:90]!r}\n      expected {ex.answer!r}, got {p.strip()[:60]!r}")
    saved = _save(model, tok, cfg, run)
    phase(0, "")
    result = {
        "model": cfg.model,
        "method": cfg.method,
        "task": cfg.data or cfg.task,
        "steps": step,
        "seconds": round(elapsed, 1),
        "trainable": trainable,
        "parameters": total,
        "trainable_share": trainable / total,
        "peak_memory_mb": _peak_memory_mb(),
        "before": {k: v for k, v in before.items() if not k.startswith("_")},
        "after": {k: v for k, v in after.items() if not k.startswith("_")},
        "saved": saved,
        "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
        "phases": phases,
    }
    io.write_json(run / "results.json", result)
    metrics.plot(run / "loss.png", title="fine-tuning loss")
    log(f"done: {saved} -> {run}")
    return result


RESUME_KEYS = (
    "model",
    "method",
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


def _check_resume(path, state: dict, cfg: FinetuneConfig, trainable: dict[str, tuple], saved: dict) -> None:
    """Refuse to resume a checkpoint made by other options or holding other trainable tensors (other LoRA targets, say),
    rather than continue with fresh weights where the saved ones do not fit."""
    was = state.get("config", {})
    changed = [f"{k}: {was.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS if k in was and was[k] != getattr(cfg, k)]
    missing = sorted(set(trainable) - set(saved))
    extra = sorted(set(saved) - set(trainable))
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


def _log_metrics(log, when: str, m: dict) -> None:
    log("      " + when + ": " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("_")))


def _peak_memory_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save(model, tok, cfg: FinetuneConfig, run: Path) -> str:
    from llmkit.model.lora import merge_and_unwrap, save_lora
    from llmkit.model.weights import save_model

    if isinstance(model, Classifier):
        save_classifier(model, run)
        return "classifier.safetensors (trained weights) + labels.json + finetune_config.json"
    if cfg.method == "lora":
        try:
            save_lora(model, run, base_model_name=cfg.model)
            return "adapter_config.json + adapter_model.safetensors (PEFT format)"
        except LlmkitError:
            pass
        merge_and_unwrap(model)
        save_model(model, run, tokenizer=tok)
        return "model.safetensors (LoRA merged: no PEFT names for this architecture)"
    if cfg.method == "full":
        save_model(model, run, tokenizer=tok)
        return "model.safetensors + config.json + tokenizer"
    from safetensors.torch import save

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with io.atomic_open(run / "adapters.safetensors", "wb") as f:
        f.write(save(state))
    return "adapters.safetensors (bottleneck adapters)"
