"""Constrained decoding: every token a row may sample keeps its text a prefix of a valid JSON document of a schema.

llguidance (Microsoft's grammar engine, the one behind vLLM's and SGLang's `guidance` backend) compiles a JSON schema
to a grammar over bytes and, for a tokenizer, computes per step the bit mask of the tokens that keep the output
valid. Each constrained row has its own matcher:

    schema ──► grammar ──► matcher(row) ──┬─► mask (V bits) ──► logits of disallowed tokens = -inf ──► sample
                                          └─◄ consume(token) ◄──────────────────────────────────────────────┘

When the document is complete the mask allows only the end-of-sequence tokens, so a constrained answer ends by itself
and always parses (unless max_tokens cuts it first, as OpenAI's API says of its own). The tokenizer's table is built
once per tokenizer (0.2-1 s for SmolLM2's 49,152 tokens); a mask then takes well under a millisecond.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit.grammar")

# tokenizer -> {(vocabulary, end tokens): LLTokenizer}: built once per tokenizer (end sets are its special tokens: few)
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BUILDING = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bit mask helpers)
    except ImportError:  # a dependency: only a broken install lacks it
        raise LlmkitError("structured output needs the llguidance package", "pip install llguidance") from None
    return llguidance


def _ll_tokenizer(tokenizer, n_vocab: int, eos_ids: list[int]):
    """llguidance's view of `tokenizer` (its `tokenizers` JSON), built once per tokenizer, vocabulary and end set."""
    with _BUILDING:
        built = _TOKENIZERS.setdefault(tokenizer, {})
        key = (n_vocab, tuple(eos_ids))
        if key not in built:
            ll = _llguidance()
            try:
                built[key] = ll.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos_ids))
            except ValueError as e:
                raise LlmkitError(f"llguidance cannot read this tokenizer: {e}", "use structured output with another model") from None
        return built[key]


def check_schema(schema: Any) -> dict:
    """`schema` as a JSON schema llguidance compiles, or an LlmkitError naming what is wrong with it."""
    _grammar(_llguidance(), schema)
    return schema


def _grammar(ll, schema: Any) -> str:
    """The llguidance grammar of a JSON schema, checked: compact JSON, as OpenAI's structured outputs write it (no free
    whitespace for a small model to wander in)."""
    if not isinstance(schema, dict):
        raise LlmkitError(f"a JSON schema is an object, not {type(schema).__name__}", 'give e.g. {"type": "object"}')
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        error = ll.LLMatcher.validate_grammar(grammar)
    except ValueError as e:
        grammar, error = "", str(e)
    if error and not error.startswith("WARNING"):
        raise LlmkitError(f"the JSON schema cannot be used: {error.splitlines()[0]}", "fix the schema (llguidance's JSON schema subset)")
    return grammar


class Constraint:
    """One row's JSON-schema constraint: `mask(logits)` hides the tokens the grammar forbids now; `consume(token)`
    advances it by the token sampled."""

    def __init__(self, tokenizer, schema: dict, n_vocab: int, eos_ids: list[int]):
        ll = _llguidance()
        self.ll_tokenizer = _ll_tokenizer(tokenizer, n_vocab, eos_ids)
        self.matcher = ll.LLMatcher(self.ll_tokenizer, _grammar(ll, schema))
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
        """Advance by the sampled token (after the end, nothing: an end-of-sequence token closes the row). A token the
        grammar refuses cannot come from its mask; should it happen, the error is logged and the row can only end."""
        if not self.matcher.is_stopped() and not self.matcher.consume_token(int(token)):
            log.error("the JSON grammar refused token %d (%s): the row ends here", token, self.matcher.get_error())
