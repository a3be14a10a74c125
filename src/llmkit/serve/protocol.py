"""The OpenAI API's request bodies, as the server accepts them, and its error shape.

Every body model forbids unknown fields: a field llmkit does not implement (`suffix`, `audio`,
...) is a 400 that names it, never a silent ignore. Fields OpenAI defines and llmkit implements keep OpenAI's names,
types and ranges; `top_k`, `repetition_penalty` and `truncate_prompt_tokens` are the extensions vLLM also accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _surrogate(value, path: str = "") -> str | None:
    """The path of the first string in `value` holding a lone surrogate (U+D800-U+DFFF: not a character, and not
    encodable as UTF-8), else None."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _surrogate(key, path) if isinstance(key, str) else None
        found = found or _surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        where = _surrogate(data)
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone surrogate (a half of a UTF-16 pair): send valid Unicode text")
        return data


class StreamOptions(Body):
    include_usage: bool = False


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's tool calls may go without)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as a chat template reads it (roles as the model knows them, calls and results kept)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name and self.role == "tool":
            out["name"] = self.name
        return out


class FunctionDef(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (an object)
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Body):
    """response_format.json_schema: OpenAI's {"name", "description"?, "schema", "strict"?}."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    """OpenAI's response_format: plain text, any JSON object, or a JSON document of a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError('response_format of type json_schema needs json_schema: {"name": ..., "schema": {...}}')
        return self

    def schema(self) -> dict | None:  # type: ignore[override]  # the JSON schema the answer must follow, None: free text
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.json_schema  # type: ignore[union-attr]
        return None


class Sampling(Body):
    """What chat and completion requests share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as the issue and OpenAI's own docs allow
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the last k prompt tokens; -1: as many as fit
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias in [-100, 100]
    ignore_eos: bool = False  # vLLM's: generate max_tokens tokens, past the end-of-sequence tokens (benchmarks)
    response_format: ResponseFormat | None = None  # json_object / json_schema: constrained decoding (llmkit.grammar)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.seed is not None and self.seed + self.n - 1 > 2**63 - 1:
            raise ValueError("seed + n - 1 must stay below 2**63")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: several calls in one answer are read whether or not it is set

    @model_validator(mode="after")
    def _tools_consistent(self):
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise ValueError("tool_choice needs tools: give the functions the model may call")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not one of the tools ({', '.join(names)})")
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        if self.forced_call() is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format and a required tool call both fix the answer's form: send one of them")
        return self

    def offered_tools(self) -> list[dict] | None:
        """The tools shown to the model (none with tool_choice "none", as OpenAI's model then calls nothing)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_call(self) -> tuple[str | None] | None:
        """(the function's name, or None for any tool) when the answer must be a call; None when it may be text."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return (self.tool_choice.function.name,)
        return (None,) if self.tool_choice == "required" else None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class TokenizeRequest(Body):
    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str
    tokens: list[int]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One readable sentence (and the field) for pydantic's errors: the first one, named by its path."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"llmkit does not support the field {param!r}; remove it from the request", param
    if kind == "missing":
        return f"the field {param!r} is required", param
    if not param and kind in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object (send it with Content-Type: application/json)", None
    return f"{param}: {first.get('msg')} (got {first.get('input')!r})" if param else str(first.get("msg")), param
