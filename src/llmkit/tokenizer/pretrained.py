"""Tokenizers of real models: a GGUF's metadata, or a Hugging Face folder's `tokenizer.json`.

A GGUF file has no `tokenizer.json`; llama.cpp stores the pieces as metadata (GGUF spec, "Tokenizer"):

    tokenizer.ggml.model        'gpt2' = byte-level BPE (SmolLM2's)
    tokenizer.ggml.tokens       the vocabulary, id order
    tokenizer.ggml.merges       'a b' merge rules, best first
    tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user-defined
    tokenizer.ggml.*_token_id   bos, eos, unk, pad
    tokenizer.chat_template     Jinja template

We rebuild the same pipeline `transformers` builds for such a file (GPT-2's byte-level BPE, control
tokens as special added tokens), so both give the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from llmkit.embedded import EMBEDDED, embedded_path
from llmkit.errors import LlmkitError
from llmkit.tokenizer.core import Tokenizer

CONTROL, USER_DEFINED = 3, 4


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
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LlmkitError(f"{path} is not a readable GGUF file ({e})", "check the file is complete (re-download or re-install it)") from None
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


def _bytes_to_unicode() -> dict[int, str]:
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
        raise LlmkitError(f"{path}: GGUF tokenizer model {model!r} is not supported yet", "use a GGUF with a byte-level BPE ('gpt2') tokenizer")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {_byte_level_spelling(t, alphabet, spelling): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>, ...) are matched whole in text, never split.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    special = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            special[role] = tokens[i]
    return Tokenizer(backend, special=special, chat_template=meta.get("tokenizer.chat_template"),
                     info={"kind": "byte-bpe", "origin": str(path), "format": "gguf"})
