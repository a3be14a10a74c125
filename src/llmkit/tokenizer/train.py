"""Training the six tokenizer kinds, with Hugging Face `tokenizers` as the engine.

    kind       model       pre-tokenization                        decode              unknown token
    word       WordLevel   words (with their leading space),       concatenation       yes
                           single punctuation marks, whitespace runs
    char       WordLevel   one character at a time                 concatenation       yes
    bpe        BPE         as `word` (whitespace pre-tokenized)    concatenation       yes
    wordpiece  WordPiece   BERT: split on whitespace, punctuation  "##" joins, spaces  yes
    byte-bpe   BPE         GPT-2 byte-level regex                  bytes -> UTF-8      never
    unigram    Unigram     SentencePiece: ' ' -> '▁' (Metaspace)   '▁' -> ' '          yes (never with byte_fallback)

`byte_fallback=True` (unigram, as SentencePiece's option of that name in Llama 2's tokenizer): 256 more tokens
<0x00>..<0xFF>, counted in the vocabulary size, spell any character the pieces do not cover as its UTF-8 bytes, so
nothing is unknown. Pretraining uses it: bits per byte must pay for every byte (Shakespeare's held-out plays have
`*`, `—`, `"` and `$`, which its training plays never use).

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


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte-fallback pieces


def build(kind: str, *, vocab_size: int, min_frequency: int, special: SpecialTokens, show_progress: bool, byte_fallback: bool = False):
    """An untrained pipeline and its trainer for `kind` (with `byte_fallback`, a trainer for the pieces only: the 256
    byte tokens are added after training)."""
    if kind not in KINDS:
        raise LlmkitError(f"unknown tokenizer kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    if byte_fallback and kind != "unigram":
        raise LlmkitError(f"byte fallback is for unigram tokenizers, not {kind}", "use --kind unigram, or byte-bpe (bytes already)")
    if kind == "byte-bpe":
        special.unk = None  # every byte has a token: nothing is ever unknown
    specials = special.tokens()
    unk = special.unk
    if unk is None and kind != "byte-bpe":
        raise LlmkitError(f"a {kind} tokenizer needs an unknown token", "keep the default <unk> special token")
    floor = len(specials) + (256 if kind == "byte-bpe" or byte_fallback else 1) + (1 if byte_fallback else 0)
    if vocab_size < floor:
        raise LlmkitError(
            f"vocabulary size {vocab_size} is too small for the {len(specials)} special tokens"
            f"{' and 256 byte tokens' if kind == 'byte-bpe' or byte_fallback else ''} of a {kind} tokenizer",
            f"use --vocab-size {floor * 2} or more, or fewer special tokens (--sentinels 0, --no-chat-tokens)",
        )
    common = dict(vocab_size=vocab_size - (256 if byte_fallback else 0), special_tokens=specials, show_progress=show_progress)
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
        # with byte fallback, the characters that spell a byte token's name stay pieces (see _with_byte_fallback)
        alphabet = sorted(set("<>x0123456789ABCDEF")) if byte_fallback else []
        trainer = trainers.UnigramTrainer(unk_token=unk, max_piece_length=16, initial_alphabet=alphabet, **common)
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
    byte_fallback: bool = False,
) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` and return it (save it with `.save(dir)`).

    `vocab_size` includes the special tokens (and the 256 byte tokens of `byte_fallback`, unigram only); a `char`
    tokenizer stops at the characters it saw.
    """
    special = special or SpecialTokens()
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise LlmkitError("cannot train a tokenizer on an empty corpus", "give --source some text")
    tok, trainer = build(
        kind,
        vocab_size=vocab_size,
        min_frequency=min_frequency if kind != "char" else 1,
        special=special,
        show_progress=show_progress,
        byte_fallback=byte_fallback,
    )
    tok.normalizer = _normalizer(kind, lowercase)
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - start
    if tok.get_vocab_size() <= len(special.tokens()):
        raise LlmkitError(f"the {kind} tokenizer learned no token beyond its special tokens", "give it more text or lower --min-frequency")
    if byte_fallback:
        tok = _with_byte_fallback(tok)
    info = {
        "kind": kind,
        "byte_fallback": byte_fallback,
        "vocab_size_requested": vocab_size,
        "min_frequency": min_frequency,
        "lowercase": lowercase,
        "train_seconds": round(seconds, 3),
    }
    tok = _stable(tok)
    return Tokenizer(tok, special=special.roles(), chat_template=DEFAULT_CHAT_TEMPLATE if special.chat else None, info=info)


def _stable(tok: Backend) -> Backend:
    """The pipeline as a save and a load give it back, so that its fingerprint (a hash of its JSON) is the saved
    file's. `tokenizers` prints a unigram's scores with up to 17 digits and reads such numbers back a last bit off:
    scores rounded to 15 significant digits read back exactly and print as they were read."""
    import json

    spec = json.loads(tok.to_str())
    if spec["model"]["type"] == "Unigram":
        spec["model"]["vocab"] = [[piece, float(f"{score:.15g}")] for piece, score in spec["model"]["vocab"]]
    return Backend.from_str(json.dumps(spec))


def _with_byte_fallback(tok: Backend) -> Backend:
    """A trained unigram pipeline plus the 256 byte tokens <0x00>..<0xFF> (the names and ByteFallback decoder of
    Llama 2's tokenizer.json) that spell, in UTF-8 bytes, the characters no piece covers.

    `tokenizers` also matches a byte token's name in text: "<0x41>" typed out would come back as "A". Its six
    characters are pieces (the trainer's alphabet), so the byte token is scored below any six pieces: spelling the
    name out always wins. Unknown characters go to bytes whatever the byte tokens' scores."""
    import json

    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"]
    lowest = min((score for piece, score in pieces if score != 0.0), default=-1.0)
    have = {piece for piece, _ in pieces}
    pieces += [[b, 6 * lowest - 1.0] for b in BYTE_TOKENS if b not in have]
    spec["model"]["byte_fallback"] = True
    out = Backend.from_str(json.dumps(spec))
    out.decoder = decoders.Sequence([decoders.ByteFallback(), tok.decoder])
    return out
