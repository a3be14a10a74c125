"""Chat: render a conversation through the model's chat template (Jinja, as `transformers` does), and keep a
multi-turn session whose answers stream; tools offered to the model and its calls read back from its answer.

The template comes with the model (a GGUF's `tokenizer.chat_template`, a `tokenizer_config.json`'s) or, for models
we train, `DEFAULT_CHAT_TEMPLATE`:

    <|system|>\\nBe brief.<|end|>\\n<|user|>\\nHi!<|end|>\\n<|assistant|>\\n
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, stream, warn_stderr
from llmkit.model.prefix import PrefixCache
from llmkit.tokenizer.core import DEFAULT_CHAT_TEMPLATE

PREFIX_MB = 256  # a chat session's earlier turns' keys and values (SmolLM2: ~5,800 tokens)


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


# How a model without tools in its chat template is told about them, and how its calls are written: the Hermes
# format (NousResearch's Hermes 2 Pro), which Qwen2.5's and many others' templates write themselves
TOOL_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def template_takes_tools(template: str) -> bool:
    """Whether a chat template writes the tools itself (it reads a `tools` variable, as transformers passes them)."""
    return re.search(r"\btools\b", template) is not None


def _arguments(call: dict):
    """A call's arguments as a template expects them (a dict, as transformers' templates iterate and `tojson` them);
    OpenAI's clients send a JSON string."""
    args = (call.get("function") or {}).get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args if args is not None else {}


def _hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that knows no tools: the tools described in the system message, each call of the
    assistant written as the model is asked to write it, each result a user turn in <tool_response> tags."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)}, ensure_ascii=False)}\n{CALL_CLOSE}"
                for c in m["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):  # results of one turn's calls together
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("tool_results", None)
    if tools:
        described = TOOL_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def render_chat(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    template: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]) under the model's chat template.
    `tools` (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]) and the messages'
    tool calls and `tool` results go to a template that takes them as transformers gives them; a template that does
    not is given the Hermes form of both (`TOOL_SYSTEM`), which `parse_tool_calls` reads back."""
    from jinja2.exceptions import TemplateError

    template = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise LlmkitError(
                f"a chat message must have 'role' and 'content', got {m!r}", 'write messages as {"role": "user", "content": "..."}'
            )
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not template_takes_tools(template):
        messages, tools = _hermes_messages(messages, tools), None
    elif uses_tools:
        messages = [
            {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in m["tool_calls"]]}
            if m.get("tool_calls")
            else m
            for m in messages
        ]
    specials = {f"{role}_token": token for role, token in tokenizer.special.items()}
    extra = {"tools": tools} if tools else {}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra, **specials)
    except TemplateError as e:
        raise LlmkitError(
            f"the chat template failed to render: {e}", "fix the template (tokenizer_config.json 'chat_template'), or pass another"
        ) from None


def chat_prompt_ids(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, template: str | None = None, tools: list[dict] | None = None
) -> list[int]:
    """The token ids of the rendered conversation, as `apply_chat_template(..., tokenize=True)`: the template writes
    its own special tokens (bos included), so the tokenizer adds none."""
    return tokenizer.encode(
        render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, template=template, tools=tools),
        add_special_tokens=False,
    )


# --- the model's tool calls, read back from its answer ---------------------------------------------------------------


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call of `tools` (of the one named `name`): {"name": ..., "arguments": {...}}, as the
    answer is constrained to when a call is required (its parameters' own schema for the arguments)."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": _closed(t["function"].get("parameters"))},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name is None or t["function"]["name"] == name
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _closed(params: dict | None) -> dict:
    """A function's parameters as a forced call's grammar takes them: an object whose listed properties are all it may
    have unless the schema says otherwise (as OpenAI's strict mode reads them; a grammar that allowed any other key let
    a small model write keys until max_tokens)."""
    if not params:
        return {"type": "object"}
    if "properties" in params and "additionalProperties" not in params:
        return {**params, "additionalProperties": False}
    return params


def _call(obj, names: set[str]) -> dict | None:
    """An OpenAI tool call from a parsed {"name", "arguments" | "parameters"} of a known function, else None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _bare_calls(text: str, names: set[str]) -> list[dict] | None:
    """The calls of an answer that is nothing but a call's JSON (or a list of them), as Llama 3.1 writes them and as a
    constrained answer is; None when it is anything else."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(o, names) for o in items]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def parse_tool_calls(text: str, names) -> tuple[str | None, list[dict]]:
    """(the content left, the calls) of a model's answer when tools were offered: each <tool_call>{json}</tool_call>
    naming a known function becomes a call (a block that does not parse, or names no tool, stays in the content), or
    the whole answer when it is only a call's JSON. Content that is empty once the calls are out is None, as OpenAI
    reports an answer that only calls."""
    names = set(names)
    bare = _bare_calls(text.strip(), names) if text.strip()[:1] in ("{", "[") else None
    if bare is not None:
        return None, bare
    calls, kept, pos = [], [], 0
    # each block, and a last one the model left open (it stopped before </tool_call>), as vLLM's hermes parser reads them
    pattern = re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE) + "|" + re.escape(CALL_OPEN) + r"(.*)$"
    for m in re.finditer(pattern, text, flags=re.S):
        try:
            call = _call(json.loads((m.group(1) if m.group(1) is not None else m.group(2)).strip()), names)
        except ValueError:
            call = None
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolCallStream:
    """`parse_tool_calls` for an answer that streams: `push(piece)` returns (content to send now, calls complete now);
    `end()` the rest. Text that may begin a <tool_call> block is held back until it is one or is not; an answer that
    starts as a call's JSON ({"name" or [{"name": a bare call, or a constrained one) is held back whole, and sent as
    content at the end if it is no call; one that starts with another bracket streams."""

    def __init__(self, names):
        self.names, self.buffer, self.started, self.bare, self.sure = set(names), "", False, False, False

    def push(self, piece: str) -> tuple[str, list[dict]]:
        self.buffer += piece
        if not self.started:
            head = self.buffer.lstrip()
            if not head:
                return "", []
            self.started, self.bare = True, head[0] in "{["
        if self.bare and not self.sure:
            compact = re.sub(r"\s", "", self.buffer)
            if any(compact.startswith(t) for t in ('{"name"', '[{"name"')):
                self.sure = True  # a call's JSON, or a list of them: held to the end
            elif not any(t.startswith(compact) for t in ('{"name"', '[{"name"')):
                self.bare = False  # text that starts with a bracket: it streams
        if self.bare:
            return "", []
        out: list[str] = []
        calls: list[dict] = []
        while True:
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                keep = next(
                    (k for k in range(min(len(CALL_OPEN) - 1, len(self.buffer)), 0, -1) if CALL_OPEN.startswith(self.buffer[-k:])), 0
                )
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return "".join(out), calls
            end = self.buffer.find(CALL_CLOSE, start)
            if end < 0:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                return "".join(out), calls
            block = self.buffer[start : end + len(CALL_CLOSE)]
            content, found = parse_tool_calls(block, self.names)
            out.append(self.buffer[:start])
            if found:
                calls.extend(found)
            else:
                out.append(block)
            self.buffer = self.buffer[end + len(CALL_CLOSE) :]

    def end(self) -> tuple[str, list[dict]]:
        rest, self.buffer = self.buffer, ""
        if self.bare:
            calls = _bare_calls(rest.strip(), self.names)
            return ("", calls) if calls is not None else (rest, [])
        if rest.startswith(CALL_OPEN):  # a last block left open
            content, calls = parse_tool_calls(rest, self.names)
            return (content or "", calls) if calls else (rest, [])
        return rest, []


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
        # the conversation's keys and values so far: each turn prefills only its new message (`llmkit.model.prefix`)
        self.prefix = PrefixCache(PREFIX_MB * 2**20) if model.config.family == "decoder" else None

    def reset(self) -> None:
        self.messages = []
        if self.prefix is not None:
            self.prefix.clear()

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
            for piece in stream(self.model, self.tok, ids, self.config, warn=self.warn, prefix=self.prefix):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def save(self, path) -> None:
        io.write_json(path, {"system": self.system, "messages": self.messages})
