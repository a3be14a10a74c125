"""Tokenizers of real models: a GGUF's metadata, or a Hugging Face folder's `tokenizer.json`.

A GGUF file has no `tokenizer.json`; llama.cpp stores the pieces as metadata (GGUF spec, "Tokenizer"):

    tokenizer.ggml.model        'gpt2' = byte-level BPE (SmolLM2's)
    tokenizer.ggml.pre          how text is split before BPE ('smollm', 'llama-bpe', 'qwen2', ...): PRE_TOKENIZERS
    tokenizer.ggml.add_bos_token  whether encoding starts with bos (llama.cpp's default: yes for the Llama 3 group)
    tokenizer.ggml.tokens       the vocabulary, id order
    tokenizer.ggml.merges       'a b' merge rules, best first
    tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user-defined
    tokenizer.ggml.*_token_id   bos, eos, unk, pad
    tokenizer.chat_template     Jinja template

We rebuild the pipeline llama.cpp runs for such a file (byte-level BPE after the split rules its `pre` names,
control tokens as special added tokens, bos added as a post-processor when the file says so), which is also what the
model's original `tokenizer.json` does. The other way, `gguf_tokenizer_fields` writes these fields for a byte-level
BPE tokenizer, choosing the `pre` name whose rebuilt pipeline encodes `PROBE_TEXTS` exactly as the tokenizer does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmkit.embedded import EMBEDDED, embedded_path
from llmkit.errors import LlmkitError
from llmkit.tokenizer.core import Tokenizer

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types

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
    return tokenizer_from_gguf_fields(gguf_fields(path, "tokenizer."), str(path))


def tokenizer_from_gguf_fields(meta: dict, path: str) -> Tokenizer:
    """The tokenizer described by a GGUF's `tokenizer.*` metadata (already read, as Python values)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise LlmkitError(
            f"{path}: GGUF tokenizer model {model!r} is not supported yet", "use a GGUF with a byte-level BPE ('gpt2') tokenizer"
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
    special = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            special[role] = tokens[i]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", llama3)  # llama.cpp's default for the Llama 3 group
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
        info={"kind": "byte-bpe", "origin": str(path), "format": "gguf", "pre": pre},
    )


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


def gguf_tokenizer_fields(tokenizer: Tokenizer, n_vocab: int) -> dict:
    """The `tokenizer.*` metadata of a GGUF (as Python values) that llama.cpp runs as `tokenizer` does: byte-level BPE
    only (llama.cpp's 'gpt2' model), `n_vocab` tokens (the model's rows; ids the tokenizer lacks become unused
    [PADn] tokens, as llama.cpp's converter writes them). The pre-tokenizer is the file's own (a GGUF tokenizer), else
    found by trying llama.cpp's names: each candidate is rebuilt as llama.cpp would run it and must encode
    `PROBE_TEXTS` (with and without special tokens) exactly as the tokenizer does; none: refused, naming why."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LlmkitError(
            f"a {tokenizer.kind} tokenizer ({model.get('type')} model) cannot be written to a GGUF that llama.cpp runs identically "
            "(llmkit writes byte-level BPE tokenizers only)",
            "export it as a Hugging Face folder (--format hf), or train the model with a byte-level BPE tokenizer (--kind byte-bpe)",
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise LlmkitError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows",
            "export the model's own tokenizer",
        )
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
