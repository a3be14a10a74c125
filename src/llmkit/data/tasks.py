"""Built-in tasks, made offline and seeded, so fine-tuning has something real and checkable to learn.

Instruction tasks for decoders (exact-match accuracy):
    arithmetic   What is 37 + 58?                                         -> 95
    reverse      Reverse the order of these words: moon river stone        -> stone river moon
    sort         Sort these words alphabetically: pear apple fig           -> apple fig pear
    dates        Write 2024-03-07 as day month year.                       -> 7 March 2024
    play         Which play is this line from? "..." (six famous plays)    -> Hamlet

Classification for encoders (accuracy, macro-F1, ROC-AUC):
    genre        a passage of 4 speech lines -> comedies, histories, problems, roman, romances or tragedies

Training and validation never overlap, by construction: a synthetic task's prompt belongs to one split for good (a
hash of its text puts a tenth of all possible prompts in validation), so no training set, however large, can hold a
validation prompt; `play` and `genre` take validation passages from the last fifth of each play, training ones from
the rest.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from llmkit.data.sources import shakespeare
from llmkit.errors import LlmkitError


@dataclass
class Example:
    """One example of a task or a data file: chat messages (decoders) or a text with a label (encoders)."""

    messages: list[dict] | None = None  # chat form (instruction, chat and text-to-text rows)
    text: str | None = None  # classification (and regression)
    label: str | int | float | None = None  # a class name, or a number (regression, or a class; see recipe.label_kind)
    text_pair: str | None = None  # a second sentence: the pair goes in as [CLS] text [SEP] text_pair [SEP]
    task: str = "data"
    answer: str | None = None  # the reference answer, for exact-match evaluation
    meta: dict = field(default_factory=dict)


WORDS = (
    "apple river stone cloud tiger candle mirror garden silver harbor falcon meadow lantern violet thunder pepper "
    "castle orchard marble willow ember copper velvet saddle raven anchor maple sparrow quartz cedar"
).split()
MONTHS = "January February March April May June July August September October November December".split()
PLAYS = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "romeo-and-juliet": "Romeo and Juliet",
    "othello": "Othello",
    "king-lear": "King Lear",
    "the-tempest": "The Tempest",
}


def _chat(prompt: str, answer: str, task: str) -> Example:
    return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], task=task, answer=answer)


def arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    return _chat(f"What is {a} {op} {b}? Answer with the number only.", str(a + b if op == "+" else a - b), "arithmetic")


def reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return _chat(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), "reverse")


def sort_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return _chat(f"Sort these words alphabetically: {' '.join(words)}", " ".join(sorted(words)), "sort")


def dates(rng: random.Random) -> Example:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return _chat(f"Write {y:04d}-{m:02d}-{d:02d} as day month year.", f"{d} {MONTHS[m - 1]} {y}", "dates")


GENERATORS = {"arithmetic": arithmetic, "reverse": reverse, "sort": sort_words, "dates": dates}
VERIFIED = tuple(GENERATORS)  # the tasks whose answers a program checks exactly (the verifiers of GRPO and of pair building)


def play_lines() -> dict[str, tuple[list[str], list[str]]]:
    """Per play: (training lines, validation lines), speech lines of 40+ characters, validation = the last fifth."""

    out = {}
    for slug, title in PLAYS.items():
        doc = next(d for d in shakespeare(slug) if d.meta["play"] == slug)
        lines = [ln.strip() for ln in doc.text.splitlines() if len(ln.strip()) >= 40 and not ln.strip().endswith(":")]
        cut = int(len(lines) * 0.8)
        out[title] = (lines[:cut], lines[cut:])
    return out


def play_examples(n: int, split: str, seed: int) -> list[Example]:
    rng = random.Random(seed)
    lines = play_lines()
    titles = sorted(lines)
    out = []
    for _ in range(n):
        title = rng.choice(titles)
        line = rng.choice(lines[title][0 if split == "train" else 1])
        out.append(_chat(f'Which Shakespeare play is this line from: "{line}"? Choose from {", ".join(titles)}.', title, "play"))
    return out


def split_of(prompt: str) -> str:
    """The split a synthetic prompt belongs to, always the same: 'val' for a tenth of all prompts, else 'train'."""
    return "val" if int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 10 == 0 else "train"


def task_examples(task: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """`n` distinct examples of a built-in instruction task for `split` ('train' or 'val')."""
    if task == "play":
        return play_examples(n, split, seed + (0 if split == "train" else 1_000_003))
    if task not in GENERATORS:
        raise LlmkitError(f"unknown task {task!r}", f"use one of: {', '.join(list(GENERATORS) + ['play', 'genre'])}, or --data FILE")
    rng = random.Random((seed, task, split).__repr__())
    out, seen, tries = [], set(), 0
    while len(out) < n and tries < n * 200:
        ex = GENERATORS[task](rng)
        tries += 1
        key = ex.messages[0]["content"]
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        out.append(ex)
    if len(out) < n:
        raise LlmkitError(f"the {task} task has only {len(out)} distinct {split} examples, not {n}", f"ask for {len(out)} or fewer")
    return out


def mixture(spec: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """Examples of several tasks by weight: 'arithmetic:2,reverse:1' -> two thirds arithmetic, one third reverse."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        parts.append((name, float(weight) if weight else 1.0))
    total = sum(w for _, w in parts)
    out = []
    for name, w in parts:
        out += task_examples(name, max(1, round(n * w / total)), split, seed)
    random.Random(seed).shuffle(out)
    return out


def genre_examples(split: str, seed: int = 0, lines_per_passage: int = 4, per_play: int = 40) -> list[Example]:
    """Passages labelled with the genre folder of their play (validation from the last fifth of each play)."""

    rng = random.Random(seed)
    out = []
    for doc in shakespeare():
        lines = [ln for ln in doc.text.splitlines() if len(ln.strip()) > 20 and not ln.endswith(":")]
        cut = int(len(lines) * 0.8)
        pool = lines[:cut] if split == "train" else lines[cut:]
        k = per_play if split == "train" else max(4, per_play // 4)
        for _ in range(k):
            start = rng.randrange(0, max(1, len(pool) - lines_per_passage))
            out.append(Example(text=" ".join(pool[start : start + lines_per_passage]), label=doc.meta["genre"], task="genre"))
    rng.shuffle(out)
    return out


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().strip(".!\"'").lower().split())
