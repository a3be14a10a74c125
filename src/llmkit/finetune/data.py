"""Fine-tuning data: rows in, (input ids, labels) out, with the loss only on the answers.

Row formats (JSONL, CSV or TSV):

    instruction      {"instruction": ..., "input": ..., "output": ...}    -> user: instruction (+ input), assistant: output
    chat             {"messages": [{"role": ..., "content": ...}, ...]}   -> every assistant turn is an answer
    text-to-text     {"source": ..., "target": ...}                       -> user: source, assistant: target
    classification   {"text": ..., "label": ...}                          -> a label for the encoder's classifier

Chat rows are rendered through the model's chat template. Labels are -100 (no loss) on everything but the assistant
turns, unless `train_on_prompt`:

    <|im_start|>user\\nWhat is 2+3?<|im_end|>\\n<|im_start|>assistant\\n 5<|im_end|>\\n
    -100 -100 ...                                                    -100 ... [ 5 <|im_end|> \\n ]  <- loss here
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.chat import render_chat
from llmkit.errors import LlmkitError

IGNORE = -100


@dataclass
class Example:
    messages: list[dict] | None = None  # chat form (instruction, chat and text-to-text rows)
    text: str | None = None  # classification
    label: str | None = None
    task: str = "data"
    answer: str | None = None  # the reference answer, for exact-match evaluation
    meta: dict = field(default_factory=dict)


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no data file at {path}", "give a .jsonl, .csv or .tsv file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LlmkitError(f"{path}:{n} is not valid JSON ({e.msg})", "fix or remove that line") from None
    if not rows:
        raise LlmkitError(f"{path} holds no rows", "give it at least one example")
    return rows


def to_example(row: dict, task: str = "data") -> Example:
    if "messages" in row:
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise LlmkitError("a chat row must end with an assistant message", "add the answer as the last message")
        return Example(messages=msgs, task=task, answer=msgs[-1]["content"])
    if "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}],
                       task=task, answer=str(row["output"]))
    if "source" in row and "target" in row:
        return Example(messages=[{"role": "user", "content": str(row["source"])}, {"role": "assistant", "content": str(row["target"])}],
                       task=task, answer=str(row["target"]))
    if "text" in row and "label" in row:
        return Example(text=str(row["text"]), label=str(row["label"]), task=task)
    raise LlmkitError(f"cannot tell the format of the row with keys {sorted(row)}",
                      "use instruction/input/output, messages, source/target, or text/label")


def encode_chat(tokenizer, messages: list[dict], *, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation; labels cover the assistant turns (or everything with train_on_prompt)."""
    ids: list[int] = []
    labels: list[int] = []
    done_text = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not before.startswith(done_text) or not upto.startswith(before):
            raise LlmkitError("the chat template does not render turn by turn (a prefix changed)", "use a template whose output grows with the messages")
        prompt_part = tokenizer.encode(before[len(done_text):], add_special_tokens=False)  # the template writes its own
        answer_part = tokenizer.encode(upto[len(before):], add_special_tokens=False)
        ids += prompt_part + answer_part
        labels += (prompt_part if train_on_prompt else [IGNORE] * len(prompt_part)) + answer_part
        done_text = upto
    return ids, labels


@dataclass
class Prepared:
    ids: list[list[int]]
    labels: list[list[int]]
    dropped: int = 0
    truncated: int = 0


def prepare_examples(tokenizer, examples: list[Example], max_len: int, *, train_on_prompt: bool = False, truncate: bool = False,
                     pack: bool = False) -> Prepared:
    """Encode chat examples; rows longer than `max_len` are dropped (or cut with `truncate`), and counted."""
    out = Prepared([], [])
    for ex in examples:
        ids, labels = encode_chat(tokenizer, ex.messages, train_on_prompt=train_on_prompt)
        if len(ids) > max_len:
            if not truncate:
                out.dropped += 1
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            out.truncated += 1
        out.ids.append(ids)
        out.labels.append(labels)
    if not out.ids:
        raise LlmkitError(f"every one of the {len(examples)} examples is longer than {max_len} tokens", "raise --max-len or pass --truncate")
    if pack:
        out.ids, out.labels = _pack(out.ids, out.labels, max_len)
    return out


def _pack(ids: list[list[int]], labels: list[list[int]], max_len: int):
    """Concatenate examples into rows of at most max_len tokens (first fit, in order)."""
    rows_i, rows_l = [[]], [[]]
    for a, b in zip(ids, labels):
        if len(rows_i[-1]) + len(a) > max_len:
            rows_i.append([])
            rows_l.append([])
        rows_i[-1] += a
        rows_l[-1] += b
    return rows_i, rows_l


def collate(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels, attention mask), each (B, T)."""
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad_id, dtype=torch.long)
    y = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for r, (a, b) in enumerate(zip(ids, labels)):
        x[r, :len(a)] = torch.tensor(a)
        y[r, :len(b)] = torch.tensor(b)
        mask[r, :len(a)] = 1
    return x, y, mask
