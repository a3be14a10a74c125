"""Training the six tokenizer kinds, with Hugging Face `tokenizers` as the engine.

    kind       model       pre-tokenization                        decode              unknown token
    word       WordLevel   words (with their leading space),       concatenation       yes
                           single punctuation marks, whitespace runs
    char       WordLevel   one character at a time                 concatenation       yes
    bpe        BPE         as `word` (whitespace pre-tokenized)    concatenation       yes
    wordpiece  WordPiece   BERT: split on whitespace, punctuation  "##" joins, spaces  yes
    byte-bpe   BPE         GPT-2 byte-level regex                  bytes -> UTF-8      never
    unigram    Unigram     SentencePiece: ' ' -> '▁' (Metaspace)   '▁' -> ' '          yes

Round trips (`decode(encode(x)) == x`): `byte-bpe` on any text, byte for byte; the other kinds after
Unicode NFC (and lower-casing when asked for): `word`, `char`, `bpe` and `unigram` on text made of characters seen in training
(`unigram` also drops spaces at the very start); `wordpiece` gives BERT's normalization instead: the
pre-tokens joined by single spaces (whitespace collapsed, punctuation set apart).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from llmkit.errors import LlmkitError
from llmkit.tokenizer.core import DEFAULT_CHAT_TEMPLATE, SpecialTokens, Tokenizer

KINDS = ("word", "char", "bpe", "wordpiece", "byte-bpe", "unigram")

# Words keep their leading space (as in GPT-2), an apostrophe inside a word stays ("o'er"), each
# punctuation mark stands alone, and whitespace runs are tokens, so nothing is lost.
WORD_SPLIT = r" ?\p{L}+(?:'\p{L}+)*| ?\p{N}+| ?[^\s\p{L}\p{N}]|\s+(?!\S)|\s+"


def _normalizer(kind: str, lowercase: bool):
    """NFC for every kind but `byte-bpe`, which (like GPT-2) keeps the exact bytes it is given."""
    steps = ([] if kind == "byte-bpe" else [normalizers.NFC()]) + ([normalizers.Lowercase()] if lowercase else [])
    return normalizers.Sequence(steps)


def build(kind: str, *, vocab_size: int, min_frequency: int, special: SpecialTokens, show_progress: bool):
    """An untrained pipeline and its trainer for `kind`."""
    if kind not in KINDS:
        raise LlmkitError(f"unknown tokenizer kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    if kind == "byte-bpe":
        special.unk = None  # every byte has a token: nothing is ever unknown
    specials = special.tokens()
    unk = special.unk
    if unk is None and kind != "byte-bpe":
        raise LlmkitError(f"a {kind} tokenizer needs an unknown token", "keep the default <unk> special token")
    floor = len(specials) + (256 if kind == "byte-bpe" else 1)
    if vocab_size < floor:
        raise LlmkitError(
            f"vocabulary size {vocab_size} is too small for the {len(specials)} special tokens of a {kind} tokenizer",
            f"use --vocab-size {floor * 2} or more, or fewer special tokens (--sentinels 0, --no-chat-tokens)",
        )
    common = dict(vocab_size=vocab_size, special_tokens=specials, show_progress=show_progress)
    if kind in ("word", "char"):
        tok = Backend(models.WordLevel(unk_token=unk))
        pattern = WORD_SPLIT if kind == "word" else r"[\s\S]"
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, **common)
    elif kind == "bpe":
        tok = Backend(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, **common)
    elif kind == "wordpiece":
        tok = Backend(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordPieceTrainer(min_frequency=min_frequency, continuing_subword_prefix="##", **common)
    elif kind == "byte-bpe":
        tok = Backend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    else:  # unigram
        tok = Backend(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(unk_token=unk, max_piece_length=16, **common)
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str] | list[str],
    kind: str = "byte-bpe",
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    lowercase: bool = False,
    special: SpecialTokens | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` and return it (save it with `.save(dir)`).

    `vocab_size` includes the special tokens; a `char` tokenizer stops at the characters it saw.
    """
    special = special or SpecialTokens()
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise LlmkitError("cannot train a tokenizer on an empty corpus", "give --source some text")
    tok, trainer = build(
        kind, vocab_size=vocab_size, min_frequency=min_frequency if kind != "char" else 1, special=special, show_progress=show_progress
    )
    tok.normalizer = _normalizer(kind, lowercase)
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - start
    if tok.get_vocab_size() <= len(special.tokens()):
        raise LlmkitError(f"the {kind} tokenizer learned no token beyond its special tokens", "give it more text or lower --min-frequency")
    info = {
        "kind": kind,
        "vocab_size_requested": vocab_size,
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "train_seconds": round(seconds, 3),
    }
    return Tokenizer(tok, special=special.roles(), chat_template=DEFAULT_CHAT_TEMPLATE if special.chat else None, info=info)
