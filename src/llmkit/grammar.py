"""Constrained decoding: every token a row may sample keeps its text a prefix of a valid JSON document of a schema.

llguidance (Microsoft's grammar engine, the one behind vLLM's and SGLang's `guidance` backend) compiles a JSON schema
to a grammar over bytes and, for a tokenizer, computes per step the bit mask of the tokens that keep the output
valid. Each constrained row has its own matcher:

    schema ──► grammar ──► matcher(row) ──┬─► mask (V bits) ──► logits of disallowed tokens = -inf ──► sample
                                          └─◄ consume(token) ◄──────────────────────────────────────────────┘

When the document is complete the mask allows only the end-of-sequence tokens, so a constrained answer ends by itself
and always parses (unless max_tokens cuts it first, as OpenAI's API says of its own). The tokenizer's table is built
once per tokenizer (~0.3 s for 49,152 tokens); a schema's first mask takes longer (its lexer, ~1-3 s), the next ones
a few milliseconds.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from llmkit.errors import LlmkitError

JSON_OBJECT: dict = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}: any JSON object

_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], Any] = {}  # (tokenizer fingerprint, vocab, eos) -> LLTokenizer


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bit mask helpers)
    except ImportError:  # a dependency: only a broken install lacks it
        raise LlmkitError("structured output needs the llguidance package", "pip install llguidance") from None
    return llguidance


def _ll_tokenizer(tokenizer, n_vocab: int, eos_ids: list[int]):
    """llguidance's view of `tokenizer` (its `tokenizers` JSON), built once per tokenizer, vocabulary and eos set."""
    key = (tokenizer.fingerprint(), n_vocab, tuple(eos_ids))
    if key not in _TOKENIZERS:
        ll = _llguidance()
        _TOKENIZERS[key] = ll.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos_ids) or None)
    return _TOKENIZERS[key]


def check_schema(schema: Any) -> dict:
    """`schema` as a JSON schema llguidance compiles, or an LlmkitError naming what is wrong with it."""
    if not isinstance(schema, dict):
        raise LlmkitError(f"a JSON schema is an object, not {type(schema).__name__}", 'give e.g. {"type": "object"}')
    ll = _llguidance()
    try:
        error = ll.LLMatcher.validate_grammar(_grammar(ll, schema))
    except ValueError as e:
        error = str(e)
    if error and not error.startswith("WARNING"):
        raise LlmkitError(f"the JSON schema cannot be used: {error.splitlines()[0]}", "fix the schema (llguidance's JSON schema subset)")
    return schema


def _grammar(ll, schema: dict) -> str:
    # compact JSON, as OpenAI's structured outputs write it (no free whitespace for a small model to wander in)
    return ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


class Constraint:
    """One row's JSON-schema constraint: `mask(logits)` hides the tokens the grammar forbids now; `consume(token)`
    advances it by the token sampled."""

    def __init__(self, tokenizer, schema: dict, n_vocab: int, eos_ids: list[int]):
        ll = _llguidance()
        self.ll_tokenizer = _ll_tokenizer(tokenizer, n_vocab, eos_ids)
        self.matcher = ll.LLMatcher(self.ll_tokenizer, _grammar(ll, check_schema(schema)))
        if self.matcher.is_error():
            raise LlmkitError(f"the JSON schema cannot be used: {self.matcher.get_error()}", "fix the schema")
        self.bitmask = ll.torch.allocate_token_bitmask(1, self.ll_tokenizer.vocab_size)  # (1, ceil(V / 32)) int32
        self._fill = ll.torch.fill_next_token_bitmask
        self.eos_ids = list(eos_ids)

    def allowed(self, width: int) -> torch.Tensor:
        """(width,) bool: the tokens that keep the output valid now (ids past the grammar's vocabulary: never)."""
        self._fill(self.matcher, self.bitmask, 0)
        bits = (self.bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (words, 32): bit j of word w is id 32w + j
        allowed = bits.reshape(-1).bool()[:width]
        if allowed.numel() < width:
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.numel()))
        if not bool(allowed.any()):  # a matcher in error (it never should be): the row ends rather than sample from nothing
            allowed[self.eos_ids] = True
        return allowed

    def consume(self, token: int) -> None:
        """Advance by the sampled token (after the end, nothing: an end-of-sequence token closes the row)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))

    @property
    def finished(self) -> bool:
        """The document is complete (only an end-of-sequence token may follow)."""
        return self.matcher.is_stopped()


def parse_or_none(text: str):
    """The JSON document of a constrained answer, or None when it was cut before its end."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
