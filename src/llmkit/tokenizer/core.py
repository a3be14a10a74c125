"""The llmkit tokenizer: a Hugging Face `tokenizers` pipeline plus the roles of its special tokens.

On disk a tokenizer is a folder in the ecosystem's format:

    tokenizer.json          the whole pipeline (normalizer, pre-tokenizer, model, decoder); loads as is in
                            `tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast`
    tokenizer_config.json   Hugging Face's sidecar: which token is bos/eos/pad/unk/mask, the chat template,
                            and an `llmkit` block (kind, training options)

Special tokens, by role (each kind keeps those it needs; `byte-bpe` has no unknown token):

    pad <pad>   unk <unk>   bos <s>   eos </s>   mask <mask>
    chat roles  <|system|> <|user|> <|assistant|> <|end|>
    sentinels   <extra_id_0> ... <extra_id_99>      (T5 span corruption)
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers

from llmkit import io
from llmkit.errors import LlmkitError

ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
N_SENTINELS = 100

# A chat template for models we train, in the Jinja form `transformers` renders.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class SpecialTokens:
    """Which special tokens a new tokenizer gets, by role, plus chat roles, sentinels and extras."""

    pad: str | None = "<pad>"
    unk: str | None = "<unk>"
    bos: str | None = "<s>"
    eos: str | None = "</s>"
    mask: str | None = "<mask>"
    chat: bool = True
    sentinels: int = N_SENTINELS
    extra: list[str] = field(default_factory=list)

    def roles(self) -> dict[str, str]:
        return {role: getattr(self, role) for role in ("pad", "unk", "bos", "eos", "mask") if getattr(self, role)}

    def tokens(self) -> list[str]:
        """All special tokens in id order: roles, chat roles, sentinels, extras."""
        out = list(self.roles().values())
        out += list(CHAT_TOKENS) if self.chat else []
        out += [f"<extra_id_{i}>" for i in range(self.sentinels)]
        out += [t for t in self.extra if t not in out]
        return out


class Tokenizer:
    """Text <-> token ids. Wraps a `tokenizers.Tokenizer` (`.backend`) and knows its special tokens.

    >>> tok = Tokenizer.load("runs/tok")            # a folder, a tokenizer.json, a GGUF, 'smollm2' or 'minilm'
    >>> ids = tok.encode("To be, or not to be")
    >>> tok.decode(ids)
    'To be, or not to be'
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special: dict[str, str] | None = None,
        chat_template: str | None = None,
        info: dict | None = None,
    ):
        self.backend = backend
        backend.no_padding()  # a shipped tokenizer.json may pad or cut to a length; batching is the caller's job
        backend.no_truncation()
        self.special = dict(special or {})  # role -> token text
        self.chat_template = chat_template
        self.info = dict(info or {})  # kind, options, origin
        for role, token in self.special.items():
            if backend.token_to_id(token) is None:
                raise LlmkitError(
                    f"special token {token!r} ({role}) is not in the vocabulary", "retrain the tokenizer with it, or drop the role"
                )

    # --- ids -------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.info.get("kind", "unknown")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def id_limit(self) -> int:
        """The highest token id + 1 (the vocabulary size, unless some ids are unused)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    def token_id(self, role_or_token: str) -> int | None:
        token = self.special.get(role_or_token, role_or_token)
        return self.backend.token_to_id(token)

    pad_id = property(lambda self: self.token_id("pad") if "pad" in self.special else None)
    unk_id = property(lambda self: self.token_id("unk") if "unk" in self.special else None)
    bos_id = property(lambda self: self.token_id("bos") if "bos" in self.special else None)
    eos_id = property(lambda self: self.token_id("eos") if "eos" in self.special else None)
    mask_id = property(lambda self: self.token_id("mask") if "mask" in self.special else None)

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of `<extra_id_0>`, `<extra_id_1>`, ... as far as the vocabulary has them."""
        ids = []
        while (i := self.backend.token_to_id(f"<extra_id_{len(ids)}>")) is not None:
            ids.append(i)
        return ids

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @functools.cached_property
    def token_bytes(self) -> list[int]:
        """How many bytes of text each id stands for (0 for special tokens), so that a sum over scored tokens gives the
        bytes they cover, for bits per byte: a byte-level token's characters are one byte each (GPT-2's byte alphabet),
        a byte-fallback token <0xXX> one byte, a unigram's ▁ a space (the one put before a text's first word
        included), a non-special added token its own UTF-8. Exact for lossless tokenizers (byte-level BPE, unigram
        with byte fallback); <unk> counts 0 bytes, and WordPiece's spaces (not in its tokens) are not counted."""
        spec = self.backend.to_str().replace(" ", "")
        byte_level = '"type":"ByteLevel"' in spec
        fallback = '"byte_fallback":true' in spec
        added = self.backend.get_added_tokens_decoder()
        out = [0] * self.id_limit
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if i in added:
                out[i] = 0 if added[i].special else len(added[i].content.encode())
            elif byte_level:
                out[i] = len(token)
            elif fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = 1
            else:
                text = token.replace("\u2581", " ")
                out[i] = len((text[2:] if self.kind == "wordpiece" and text.startswith("##") else text).encode())
        return out

    # --- text <-> ids ----------------------------------------------------------------------
    def encode(
        self, text: str, *, add_special_tokens: bool = True, add_bos: bool = False, add_eos: bool = False, max_length: int | None = None
    ) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer itself adds, as `transformers` does by default:
        its post-processor (BERT's [CLS] ... [SEP], T5's ... </s>, Llama 3's <|begin_of_text|> ...; a GGUF's
        `add_bos_token`). `add_special_tokens=False` gives the bare text's ids (chat templates and data shards write
        their own); `add_bos` / `add_eos` add those tokens explicitly (once: not when already there). `max_length` cuts
        the text's ids so that, with the special tokens, at most that many remain ([SEP] stays at the end)."""
        if max_length is None:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            enc = self.backend.encode(text, add_special_tokens=False)
            extra = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
            enc.truncate(max(max_length - extra - int(add_bos) - int(add_eos), 0))
            ids = (self.backend.post_process(enc) if add_special_tokens else enc).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_pair(self, text: str, pair: str, *, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, token types) of a sentence pair through the post-processor's pair template (BERT: [CLS] a [SEP] b [SEP],
        types 0 then 1); `max_length` cuts the longer of the two first, as transformers' truncation='longest_first'."""
        if max_length:
            self.backend.enable_truncation(max_length, strategy="longest_first")
        try:
            enc = self.backend.encode(text, pair, add_special_tokens=True)
        finally:
            self.backend.no_truncation()
        return enc.ids, enc.type_ids

    def encode_batch(
        self, texts: list[str], *, add_special_tokens: bool = True, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once, in parallel on all cores (the Rust thread pool); options as `encode`."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encode(texts, add_special_tokens=add_special_tokens)]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and ids[:1] != [self._required("bos")]:
            ids = [self._required("bos")] + ids
        if add_eos and ids[-1:] != [self._required("eos")]:
            ids = ids + [self._required("eos")]
        return ids

    def _required(self, role: str) -> int:
        i = self.token_id(role) if role in self.special else None
        if i is None:
            raise LlmkitError(f"this tokenizer has no {role} token", f"train it with a {role} special token")
        return i

    def decode(self, ids, *, skip_special_tokens: bool = False, strict: bool = True) -> str:
        """The text of `ids`. An id beyond the vocabulary is an error naming it; with `strict=False` it decodes to
        nothing, as in `transformers` (a model's padded vocabulary rows, e.g. T5's 32,128 rows for 32,100 tokens)."""
        ids = [int(i) for i in ids]
        limit = self.id_limit
        bad = next((i for i in ids if i < 0 or (strict and i >= limit)), None)
        if bad is not None:
            raise LlmkitError(
                f"token id {bad} is outside this tokenizer's vocabulary of {limit} (ids must be 0..{limit - 1})",
                "decode with the tokenizer the ids were made with",
            )
        if not strict:
            ids = [i for i in ids if i < limit]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokens(self, text: str) -> list[str]:
        """The token strings of `text` (for looking at a tokenization)."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def fingerprint(self) -> str:
        """A short hash of the whole pipeline: shards and checkpoints record it to refuse a mismatch."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # --- files -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (atomically)."""
        directory = Path(directory)
        io.write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        io.write_json(directory / "tokenizer_config.json", self.hf_config())
        return directory

    def hf_config(self) -> dict:
        """The `tokenizer_config.json` that `transformers` reads."""
        added = self.backend.get_added_tokens_decoder()
        roles = set(self.special.values())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update({f"{role}_token": token for role, token in self.special.items()})
        config["additional_special_tokens"] = [t.content for _, t in sorted(added.items()) if t.special and t.content not in roles]
        if self.chat_template:
            config["chat_template"] = self.chat_template
        config["llmkit"] = self.info
        return config

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a tokenizer folder, a `tokenizer.json`, a model folder, a GGUF file or an embedded name."""
        from llmkit.tokenizer import pretrained

        return pretrained.load_tokenizer(path)

    @classmethod
    def from_folder(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = Path(directory)
        file = directory / "tokenizer.json" if directory.is_dir() else directory
        if not file.exists():
            raise LlmkitError(f"no tokenizer.json at {file}", "train one with `llmkit tokenizer train` or point at a folder that has one")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust loader's message names the broken field
            raise LlmkitError(
                f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})", "re-train or re-export the tokenizer"
            ) from None
        config_file = file.parent / "tokenizer_config.json"
        config = io.read_json(config_file) if config_file.exists() else {}
        special = {role: _token_text(config.get(f"{role}_token")) for role in ROLES}
        special = {r: t for r, t in special.items() if t and backend.token_to_id(t) is not None}
        info = config.get("llmkit") or {"kind": _guess_kind(backend), "origin": str(file)}
        return cls(backend, special=special, chat_template=config.get("chat_template"), info=info)


def _token_text(value) -> str | None:
    """`tokenizer_config.json` spells a token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _guess_kind(backend: tokenizers.Tokenizer) -> str:
    model = type(backend.model).__name__
    pre = type(backend.pre_tokenizer).__name__ if backend.pre_tokenizer is not None else ""
    if model == "BPE" and "ByteLevel" in (pre + backend.to_str()[:2000]):
        return "byte-bpe"
    return {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram", "WordLevel": "word"}.get(model, model.lower())
