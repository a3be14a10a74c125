"""Fine-tuning data: rows in, (input ids, labels) out, with the loss only on the answers.

Row formats (JSONL, CSV or TSV):

    instruction      {"instruction": ..., "input": ..., "output": ...}    -> user: instruction (+ input), assistant: output
    chat             {"messages": [{"role": ..., "content": ...}, ...]}   -> every assistant turn is an answer
    text-to-text     {"source": ..., "target": ...}                       -> user: source, assistant: target
    classification   {"text": ..., "label": ...}                          -> a label for the encoder's classifier
    pairs            {"text": ..., "text_pair": ..., "label": ...}        -> [CLS] text [SEP] text_pair [SEP] (token types)
    regression       {"text": ..., "label": 3.8}                          -> a number for the encoder's regressor (numbers that
                                                                             are all whole are classes, unless --regression)

Chat rows are rendered through the model's chat template. Labels are -100 (no loss) on everything but the assistant
turns, unless `train_on_prompt`:

    <|im_start|>user\\nWhat is 2+3?<|im_end|>\\n<|im_start|>assistant\\n 5<|im_end|>\\n
    -100 -100 ...                                                    -100 ... [ 5 <|im_end|> \\n ]  <- loss here
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit import io as llmkit_io
from llmkit.chat import render_chat
from llmkit.data.tasks import Example
from llmkit.errors import LlmkitError
from llmkit.model.layers import pad_right

IGNORE = -100


def read_rows(path: str | Path, warn=None) -> list[dict]:
    """Rows of a JSONL, CSV or TSV file. JSON Lines split at \\n only (a row may hold U+2028 or \\r); CSV fields may
    hold quoted newlines. Invalid UTF-8 bytes become U+FFFD and are counted (`warn` hears how many)."""
    from llmkit.data.sources import read_text

    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no data file at {path}", "give a .jsonl, .csv or .tsv file")
    text, bad = read_text(path)
    if bad and warn is not None:
        warn(f"warning: {path}: {bad} invalid UTF-8 byte(s) replaced by U+FFFD")
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        rows = [row for _, row in llmkit_io.parse_jsonl(text, path, "fix or remove that line")]
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
        return Example(
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}],
            task=task,
            answer=str(row["output"]),
        )
    if "source" in row and "target" in row:
        return Example(
            messages=[{"role": "user", "content": str(row["source"])}, {"role": "assistant", "content": str(row["target"])}],
            task=task,
            answer=str(row["target"]),
        )
    if "text" in row and "label" in row:
        label = row["label"]
        if not isinstance(label, (int, float)) or isinstance(label, bool):  # numbers stay numbers: regression, or classes
            label = str(label)
        pair = row.get("text_pair")
        return Example(text=str(row["text"]), label=label, text_pair=None if pair is None else str(pair), task=task)
    raise LlmkitError(
        f"cannot tell the format of the row with keys {sorted(row)}", "use instruction/input/output, messages, source/target, or text/label"
    )


def encode_chat(tokenizer, messages: list[dict], *, train_on_prompt: bool = False, last_only: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation; labels cover the assistant turns (or everything with train_on_prompt;
    only the last assistant turn with `last_only`: a preference pair's answer after a conversation)."""
    ids: list[int] = []
    labels: list[int] = []
    done_text = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done_text) or not upto.startswith(before):
            raise LlmkitError(
                "the chat template does not render turn by turn (a prefix changed)", "use a template whose output grows with the messages"
            )
        prompt_part = tokenizer.encode(before[len(done_text) :], add_special_tokens=False)  # the template writes its own
        answer_part = tokenizer.encode(upto[len(before) :], add_special_tokens=False)
        ids += prompt_part + answer_part
        answer_labels = answer_part if not last_only or i == len(messages) - 1 else [IGNORE] * len(answer_part)
        labels += (prompt_part if train_on_prompt else [IGNORE] * len(prompt_part)) + answer_labels
        done_text = upto
    return ids, labels


@dataclass
class Prepared:
    ids: list[list[int]]
    labels: list[list[int]]
    dropped: int = 0
    truncated: int = 0
    segments: list[list[int]] | None = None  # packed rows: which example each token belongs to


def prepare_examples(
    tokenizer, examples: list[Example], max_len: int, *, train_on_prompt: bool = False, truncate: bool = False, pack: bool = False
) -> Prepared:
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
        raise LlmkitError(
            f"every one of the {len(examples)} examples is longer than {max_len} tokens", "raise --max-len or pass --truncate"
        )
    if pack:
        out.ids, out.labels, out.segments = _pack(out.ids, out.labels, max_len)
    return out


def _pack(ids: list[list[int]], labels: list[list[int]], max_len: int):
    """Concatenate examples into rows of at most max_len tokens (in order); each token keeps its example's number, so
    attention stays inside an example and positions restart with each (as torchtune's packed datasets do)."""
    rows_i, rows_l, rows_s = [[]], [[]], [[]]
    for a, b in zip(ids, labels):
        if len(rows_i[-1]) + len(a) > max_len:
            rows_i.append([])
            rows_l.append([])
            rows_s.append([])
        segment = rows_s[-1][-1] + 1 if rows_s[-1] else 0
        if segment:  # the previous example's last token must not learn to predict this one's first
            b = [IGNORE] + list(b[1:])
        rows_i[-1] += a
        rows_l[-1] += b
        rows_s[-1] += [segment] * len(a)
    return rows_i, rows_l, rows_s


def collate_packed(ids: list[list[int]], labels: list[list[int]], segments: list[list[int]], pad_id: int, device=None):
    """Right-padded packed rows: (input ids, labels, block-causal mask (B, T, T), positions (B, T)). Token i may see
    token j of its row only when both belong to the same example; positions count from 0 in every example.

        examples  a a a b b c          mask (1 = may attend)    positions
                                       a: 1 . . . . .           0 1 2 0 1 0
                                          1 1 . . . .
                                          1 1 1 . . .
                                       b: . . . 1 . .
                                          . . . 1 1 .
                                       c: . . . . . 1
    """
    x, y, real = collate(ids, labels, pad_id)
    B, T = x.shape
    host = torch.device("cpu")  # built in host memory, copied to `device` once
    seg = torch.full((B, T), -1, dtype=torch.long, device=host)
    for r, s in enumerate(segments):
        seg[r, : len(s)] = torch.tensor(s, device=host)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (B, T, T)
    mask = same & torch.ones(T, T, dtype=torch.bool, device=host).tril()
    mask |= torch.eye(T, dtype=torch.bool, device=host)  # a padding position sees itself (no row of the softmax may be empty)
    starts = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=host), seg[:, 1:] != seg[:, :-1]], dim=1)
    index = torch.arange(T, device=host).expand(B, T)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return tuple(t.to(device) if device is not None else t for t in (x, y, mask.long(), (index - last_start) * real))


def collate(ids: list[list[int]], labels: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels, attention mask), each (B, T), on `device`."""
    x, mask = pad_right(ids, pad_id, device)
    y, _ = pad_right(labels, IGNORE, device)  # each row of labels as long as its ids
    return x, y, mask
