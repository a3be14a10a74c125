"""Chat: render a conversation through the model's chat template (Jinja, as `transformers` does), and keep a
multi-turn session whose answers stream.

The template comes with the model (a GGUF's `tokenizer.chat_template`, a `tokenizer_config.json`'s) or, for models
we train, `DEFAULT_CHAT_TEMPLATE`:

    <|system|>\\nBe brief.<|end|>\\n<|user|>\\nHi!<|end|>\\n<|assistant|>\\n
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, stream, warn_stderr
from llmkit.tokenizer.core import DEFAULT_CHAT_TEMPLATE


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, template: str | None = None) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]) under the model's chat template."""
    from jinja2.exceptions import TemplateError

    template = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LlmkitError(
                f"a chat message must have 'role' and 'content', got {m!r}", 'write messages as {"role": "user", "content": "..."}'
            )
    specials = {f"{role}_token": token for role, token in tokenizer.special.items()}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **specials)
    except TemplateError as e:
        raise LlmkitError(
            f"the chat template failed to render: {e}", "fix the template (tokenizer_config.json 'chat_template'), or pass another"
        ) from None


def chat_prompt_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, template: str | None = None) -> list[int]:
    """The token ids of the rendered conversation, as `apply_chat_template(..., tokenize=True)`: the template writes
    its own special tokens (bos included), so the tokenizer adds none."""
    return tokenizer.encode(
        render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, template=template), add_special_tokens=False
    )


class ChatSession:
    """A conversation with a model: `send(text)` streams the answer and keeps both turns in the history."""

    def __init__(self, model, tokenizer=None, *, system: str | None = None, config: GenerationConfig | None = None, warn=warn_stderr):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)  # a loaded model carries its own
        if tokenizer is None:
            raise LlmkitError(
                "this model has no tokenizer", "pass one: ChatSession(model, tokenizer), or load a folder with tokenizer.json"
            )
        self.model, self.tok, self.config, self.warn = model, tokenizer, config or GenerationConfig(), warn
        self.system = system
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation; the oldest turns are dropped while it does not fit the context."""
        room = self.model.config.max_seq_len - max(self.config.max_new_tokens - 1, 0)  # the last new token is never fed
        while True:
            ids = chat_prompt_ids(self.tok, self.conversation())
            if len(ids) <= room:
                return ids
            if len(self.messages) <= 1:
                raise LlmkitError(
                    f"the message is {len(ids)} tokens; with {self.config.max_new_tokens} new tokens it does not fit "
                    f"the context of {self.model.config.max_seq_len}",
                    "send a shorter message or lower --max-new-tokens",
                )
            self.messages = self.messages[2:]  # forget the oldest exchange
            self.warn("(the oldest turns were dropped to fit the context)")

    def send(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`. Stopping the iteration early (Ctrl-C) keeps the partial answer."""
        if not text.strip():
            raise LlmkitError("the message is empty", "type something to send")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._prompt_ids()
        except LlmkitError:
            self.messages.pop()
            raise
        answer = []
        try:
            for piece in stream(self.model, self.tok, ids, self.config, warn=self.warn):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def save(self, path) -> None:
        io.write_json(path, {"system": self.system, "messages": self.messages})
