"""Tokenizers of real models: a GGUF's metadata, or a Hugging Face folder's `tokenizer.json`.

A GGUF file has no `tokenizer.json`; llama.cpp stores the pieces as metadata (GGUF spec, "Tokenizer"):

    tokenizer.ggml.model        'gpt2' = byte-level BPE (SmolLM2's, Qwen's, Llama 3's); 'llama' = SentencePiece BPE
                                with byte fallback (Gemma's, Phi-3's, Llama 2's, Mistral's)
    tokenizer.ggml.pre          how text is split before BPE ('smollm', 'llama-bpe', 'qwen2', ...): PRE_TOKENIZERS
    tokenizer.ggml.add_bos_token  whether encoding starts with bos (llama.cpp's default: yes for the Llama 3 group)
    tokenizer.ggml.tokens       the vocabulary, id order
    tokenizer.ggml.merges       'a b' merge rules, best first (byte-level BPE)
    tokenizer.ggml.scores       each token's score (SentencePiece: the merge order, best highest)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.add_space_prefix  SentencePiece: a space before the text (llama.cpp's default: yes)
    tokenizer.ggml.*_token_id   bos, eos, unk, pad
    tokenizer.chat_template     Jinja template

We rebuild the pipeline llama.cpp runs for such a file (byte-level BPE after the split rules its `pre` names,
control tokens as special added tokens, bos added as a post-processor when the file says so), which is also what the
model's original `tokenizer.json` does. The other way, `gguf_tokenizer_fields` writes these fields for a byte-level
BPE tokenizer, choosing the `pre` name whose rebuilt pipeline encodes `PROBE_TEXTS` exactly as the tokenizer does.

A SentencePiece vocabulary has no merges in the file: they are recovered from the scores (each token made from two
of the vocabulary's tokens, best score first: what llama.cpp's merging by score does, and what `transformers` and
`tokenizers` recover), then run as a BPE with byte fallback after the family's handling of spaces (`SPM_STYLES`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmkit.embedded import EMBEDDED, embedded_path
from llmkit.errors import LlmkitError
from llmkit.tokenizer.core import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

# Split rules of llama.cpp's pre-tokenizer types (src/llama-vocab.cpp), as `tokenizers` regexes applied one after the
# other, each splitting the pieces the previous one left ("isolated"), then the byte-level alphabet.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],  # llama.cpp's own default
    "gpt2": [_GPT2],
    "digits": [r"\p{N}", _GPT2],  # single digits first (SmolLM, StarCoder)
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],  # numbers in groups of up to three, a letter run with one leading non-letter
    "qwen2": [_QWEN2],  # as Llama 3, one digit at a time
}
# tokenizer.ggml.pre -> (split rules, Llama 3's extras: whole words in the vocabulary skip the merges, bos by default)
PRE_TOKENIZERS = {
    **{name: ("default", False) for name in ("default", "")},
    **{name: ("gpt2", False) for name in ("gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{name: ("digits", False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    "falcon": ("falcon", False),
    **{name: ("llama3", True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")},
    **{name: ("llama3", False) for name in ("dbrx", "smaug-bpe")},
    **{name: ("qwen2", False) for name in ("qwen2", "stablelm2", "hunyuan", "deepseek-r1-qwen", "megrez")},
}


def _pre_tokenizer(kind: str):
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[kind]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a folder, a `tokenizer.json`, a GGUF file or an embedded model name."""
    if str(path) in EMBEDDED:
        path = embedded_path(str(path))
    path = Path(path)
    if path.suffix == ".gguf":
        return from_gguf(path)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return from_gguf(ggufs[0])
    if not path.exists():
        raise LlmkitError(f"no tokenizer at {path}", "give a folder with tokenizer.json, a GGUF file, or one of: " + ", ".join(EMBEDDED))
    return Tokenizer.from_folder(path)


def gguf_fields(path: str | os.PathLike, prefix: str = "") -> dict:
    """GGUF metadata as Python values (strings decoded, arrays as lists), keys starting with `prefix`."""
    from llmkit import io

    reader = io.open_gguf(path)
    out = {}
    for key, f in reader.fields.items():
        if key.startswith(prefix):
            out[key] = f.contents()
    return out


def _byte_level_spelling(token: str, alphabet: set[str], spelling: dict[int, str]) -> str:
    """llama.cpp writes some tokens as raw text; the byte-level vocabulary spells every byte as a char."""
    if set(token) <= alphabet:
        return token
    return "".join(spelling[b] for b in token.encode("utf-8"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def from_gguf(path: str | os.PathLike) -> Tokenizer:
    fields = gguf_fields(path)
    return tokenizer_from_gguf_fields(
        {k: v for k, v in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}, str(path)
    )


def tokenizer_from_gguf_fields(meta: dict, path: str) -> Tokenizer:
    """The tokenizer described by a GGUF's `tokenizer.*` metadata (already read, as Python values; with
    `general.architecture`, which says how a SentencePiece vocabulary treats spaces)."""
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_from_gguf_fields(meta, path)
    if model != "gpt2":
        raise LlmkitError(
            f"{path}: GGUF tokenizer model {model!r} is not supported",
            "use a GGUF with a byte-level BPE ('gpt2') or SentencePiece BPE ('llama') tokenizer",
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise LlmkitError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported, so its text would be split wrongly",
            f"use a GGUF whose tokenizer.ggml.pre is one of: {', '.join(sorted(p for p in PRE_TOKENIZERS if p))}",
        )
    kind, llama3 = PRE_TOKENIZERS[pre]
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {_byte_level_spelling(t, alphabet, spelling): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    backend.pre_tokenizer = _pre_tokenizer(kind)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>, ...) are matched whole in text, never split.
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    )
    return _finish(backend, meta, tokens, path, llama3, {"kind": "byte-bpe", "origin": str(path), "format": "gguf", "pre": pre})


def _finish(backend: Backend, meta: dict, tokens: list[str], path: str, add_bos_default: bool, info: dict) -> Tokenizer:
    """The special tokens by role, bos / eos added as the file says (as a post-processor, so `encode` adds them and a
    saved tokenizer.json keeps doing so), and the chat template: the same for every tokenizer model."""
    special = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            special[role] = tokens[i]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)  # llama.cpp's default when the file is silent
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and role not in special:
            raise LlmkitError(
                f"{path}: the file asks for a {role} token on every text but names none", f"set tokenizer.ggml.{role}_token_id"
            )
    if add_bos or add_eos:  # as a post-processor, so `encode` adds them and the saved tokenizer.json keeps doing so
        bos, eos = special.get("bos"), special.get("eos")

        def template(seq: str, type_id: int) -> str:
            parts = ([f"{bos}:{type_id}"] if add_bos else []) + [f"${seq}:{type_id}"] + ([f"{eos}:{type_id}"] if add_eos else [])
            return " ".join(parts)

        backend.post_processor = processors.TemplateProcessing(
            single=template("A", 0),
            pair=template("A", 0) + " " + template("B", 1),
            special_tokens=[(t, backend.token_to_id(t)) for t, flag in ((bos, add_bos), (eos, add_eos)) if flag],
        )
    return Tokenizer(
        backend,
        special=special,
        chat_template=meta.get("tokenizer.chat_template"),
        info=info,
    )


# How each family's SentencePiece vocabulary treats spaces, as its own tokenizer (and transformers' reading of its
# GGUF) does; llama.cpp's add_space_prefix says whether a space goes before the text.
#   metaspace   Llama 2, Mistral, TinyLlama: spaces as "▁", one "▁" before the text unless it starts with a space
#   prepend     Phi-3: one "▁" before the text, always (as llama.cpp's " " + text)
#   gemma       Gemma 1-3: spaces as "▁", nothing before the text; runs of spaces are tokens of their own
SPM_STYLES = {"phi3": "prepend", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every token that two of the vocabulary's tokens join to
    make, best score first (ties: the longer left piece first, then the longer right piece; one token's splits in
    the order of their pieces' ids), as `tokenizers`' and `transformers`' recovery orders them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_from_gguf_fields(meta: dict, path: str) -> Tokenizer:
    """A GGUF's SentencePiece BPE vocabulary ('llama'): the merges recovered from the scores (Gemma's from the
    tokens' order: its scores do not follow its merges), byte fallback for what no token spells, the family's spaces
    (`SPM_STYLES`), control tokens matched whole."""
    arch = meta.get("general.architecture", "llama")
    style = SPM_STYLES.get(arch, "metaspace")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if style == "gemma":  # Gemma's files spell its tokens of 2+ spaces as spaces; its vocabulary has "▁▁"
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise LlmkitError(
                f"{path}: a SentencePiece vocabulary without tokenizer.ggml.scores (its merge order)",
                "use a GGUF written by llama.cpp's converter",
            )
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", style != "gemma"))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "gemma":
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif style == "prepend":
        backend.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    if prefix and style != "gemma":
        steps.append(decoders.Strip(" ", 1, 0))  # the space put before the text
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    info = {"kind": "bpe", "origin": str(path), "format": "gguf", "spm": style, "add_space_prefix": prefix}
    return _finish(backend, meta, tokens, path, True, info)  # llama.cpp adds bos to a SentencePiece text by default


# Texts on which a tokenizer written to a GGUF must encode as the original does: scripts, digits, code, emoji, runs
# of spaces and newlines, contractions and chat markup. Also the test set of the families' tokenizers.
PROBE_TEXTS = (
    "Hello world! It's 2026; we've 3.14159 reasons, don't we?",
    "  leading spaces,\ttabs\t\tand\n\nnewlines\r\n   trailing   ",
    "Ça va? Grüße aus Köln. Niño, año, façade. Ελληνικά και русский текст.",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "مرحبا بالعالم — हिन्दी पाठ — ภาษาไทย",
    "def f(x):\n    return [i ** 2 for i in range(10) if i % 3 == 0]  # comment\n",
    'if (a != b && c <= 0x1F) { printf("%d\\n", a); }',
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ and 12345678901234567890",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "I'LL SAY IT'S FINE, THEY'RE HERE AND I'M DONE.",
)

# tokenizer.ggml.pre names llama.cpp knows, tried in this order (the first that encodes PROBE_TEXTS alike is written)
PRE_CANDIDATES = ("gpt-2", "smollm", "llama-bpe", "dbrx", "qwen2", "falcon", "default")


def gguf_tokenizer_fields(tokenizer: Tokenizer, n_vocab: int, architecture: str = "llama") -> dict:
    """The `tokenizer.*` metadata of a GGUF (as Python values) that llama.cpp runs as `tokenizer` does, for a model of
    llama.cpp's `architecture`: `n_vocab` tokens (the model's rows; ids the tokenizer lacks become unused [PADn]
    tokens, as llama.cpp's converter writes them). A byte-level BPE is llama.cpp's 'gpt2' model, its pre-tokenizer
    the file's own (a GGUF tokenizer), else found by trying llama.cpp's names: each candidate is rebuilt as llama.cpp
    would run it and must encode `PROBE_TEXTS` (with and without special tokens) exactly as the tokenizer does. A
    SentencePiece BPE with byte fallback (Gemma, Phi-3, Llama 2) is llama.cpp's 'llama' model (`_sentencepiece_fields`).
    Anything else, or a rebuilt tokenizer that encodes differently: refused, naming why."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level
    if not sentencepiece and (model.get("type") != "BPE" or not byte_level):
        raise LlmkitError(
            f"a {tokenizer.kind} tokenizer ({model.get('type')} model) cannot be written to a GGUF that llama.cpp runs identically "
            "(llmkit writes byte-level BPE and SentencePiece BPE tokenizers)",
            "export it as a Hugging Face folder (--format hf), or train the model with a byte-level BPE tokenizer (--kind byte-bpe)",
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise LlmkitError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows",
            "export the model's own tokenizer",
        )
    if sentencepiece:
        return _sentencepiece_fields(tokenizer, spec, vocab, n_vocab, architecture)
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: dict = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    fields.update(_common_fields(tokenizer))
    own = tokenizer.info.get("pre") if tokenizer.info.get("format") == "gguf" else None
    splits = tokenizer.backend.pre_tokenizer

    def pieces(pre_tokenizer, text: str) -> list[str]:
        return [p for p, _ in pre_tokenizer.pre_tokenize_str(text)]

    for pre in (own,) if own else PRE_CANDIDATES:
        candidate = {**fields, "tokenizer.ggml.pre": pre}
        rebuilt = tokenizer_from_gguf_fields(candidate, "export").backend
        # the same split of the text (not only the same ids: a vocabulary without multi-digit tokens encodes digits
        # alike under Llama 3's and Qwen2's rules), then the same ids with and without the special tokens
        if all(pieces(rebuilt.pre_tokenizer, text) == pieces(splits, text) for text in PROBE_TEXTS) and all(
            rebuilt.encode(text, add_special_tokens=s).ids == tokenizer.backend.encode(text, add_special_tokens=s).ids
            for text in PROBE_TEXTS
            for s in (False, True)
        ):
            return candidate
    raise LlmkitError(
        f"no llama.cpp pre-tokenizer splits text as this tokenizer does (tried {', '.join((own,) if own else PRE_CANDIDATES)})",
        "export it as a Hugging Face folder (--format hf), or train the model with llmkit's byte-level BPE",
    )


def _common_fields(tokenizer: Tokenizer) -> dict:
    """Special token ids by role, whether bos / eos go around every text, and the chat template."""
    fields: dict = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = tokenizer.token_id(role) if role in tokenizer.special else None
        if i is not None:
            fields[f"tokenizer.ggml.{key}"] = i
    bare = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    fields["tokenizer.ggml.add_bos_token"] = len(full) > len(bare) and full[0] == tokenizer.bos_id
    fields["tokenizer.ggml.add_eos_token"] = len(full) > len(bare) and full[-1] == tokenizer.eos_id
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def _sentencepiece_fields(tokenizer: Tokenizer, spec: dict, vocab: dict[str, int], n_vocab: int, architecture: str) -> dict:
    """llama.cpp's 'llama' tokenizer for a SentencePiece BPE with byte fallback: the tokens in id order (Gemma's runs
    of "▁" stay "▁": llama.cpp turns the text's spaces into "▁" before it merges), each token's score its merge's rank
    (llama.cpp merges the adjacent pair whose joined token scores highest: best merge first), token types (control,
    user-defined, byte, unknown, unused), and whether a space goes before the text. Checked as the byte-level
    tokenizers are: read back as llmkit reads a GGUF of `architecture` (the family's handling of spaces), it must
    encode `PROBE_TEXTS` exactly as `tokenizer` does."""
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"].get("merges", [])]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    added = tokenizer.backend.get_added_tokens_decoder()
    unk = spec["model"].get("unk_token")
    tokens, types, scores = [f"[PAD{i}]" for i in range(n_vocab)], [UNUSED] * n_vocab, [-float(len(merges) + n_vocab)] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        scores[i] = -float(rank[token]) if token in rank else -float(len(merges) + i)
        if i in added:
            types[i] = CONTROL if added[i].special else USER_DEFINED
        elif token == unk:
            types[i] = UNKNOWN
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prefix = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": prefix,
        **_common_fields(tokenizer),
    }
    rebuilt = tokenizer_from_gguf_fields({**fields, "general.architecture": architecture}, "export").backend
    for t in PROBE_TEXTS:
        for special in (False, True):
            if rebuilt.encode(t, add_special_tokens=special).ids != tokenizer.backend.encode(t, add_special_tokens=special).ids:
                raise LlmkitError(
                    f"this SentencePiece tokenizer, written for llama.cpp's {architecture}, would encode {t[:40]!r} differently "
                    "(its handling of spaces is not the one llama.cpp gives that architecture)",
                    "export it as a Hugging Face folder (--format hf)",
                )
    return fields
