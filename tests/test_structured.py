"""Structured output: constrained decoding by a JSON schema (llguidance) in `generate`, in the serving engine's batched
rows and in the OpenAI API's `response_format`. A tiny random model knows no JSON at all, so every answer that parses
and validates (checked with `jsonschema`, the reference validator) is the grammar's doing; greedy and sampled, alone
and beside free rows, which stay exactly as they are alone."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, generate
from llmkit.grammar import check_schema
from llmkit.model.weights import save_model

from conftest import KEY, LiveServer, engine_results, run_cli, served_model

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
]


@pytest.fixture(scope="module")
def model(tokenizers_by_kind):
    return served_model(tokenizers_by_kind["byte-bpe"], max_seq_len=1024)  # room for the tools in a prompt


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array", "enum"])
def test_every_constrained_answer_parses_and_validates(model, schema):
    tok = model.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("To be, or not", "Friends, Romans", "O Romeo")]
    for cfg in (
        GenerationConfig(max_new_tokens=120, do_sample=False, json_schema=schema),
        GenerationConfig(max_new_tokens=120, temperature=1.0, seed=3, json_schema=schema),
    ):
        for g in generate(model, tok, prompts, cfg):
            assert g.finish_reason == "stop", g.text
            jsonschema.validate(json.loads(g.text), schema)
    free = generate(model, tok, prompts[:1], GenerationConfig(max_new_tokens=30, do_sample=False, stop_token_ids=[]))[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # unconstrained, the same model writes no JSON


def test_the_engine_masks_each_row_alone(model):
    """Constrained and free requests in one batch (joining at different steps): the constrained ones validate, the free
    ones equal their answers alone token for token."""
    from llmkit.serve import Engine

    tok = model.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("To be, or not", "Friends, Romans", "O Romeo", "Now is the winter")]
    jobs = []
    for i, p in enumerate(prompts):
        schema = SCHEMAS[i % 2] if i % 2 == 0 else None
        jobs.append((p, GenerationConfig(max_new_tokens=60, do_sample=i != 2, seed=i, json_schema=schema)))
    alone = [generate(model, tok, [p], c)[0] for p, c in jobs]
    engine = Engine(model, "structured", max_batch=4, max_queue=8)
    try:
        together = engine_results(engine, jobs, stagger=0.01)
    finally:
        engine.close()
    for (_, cfg), a, b in zip(jobs, alone, together):
        assert b["ids"] == a.ids and b["text"] == a.text
        if cfg.json_schema is not None:
            jsonschema.validate(json.loads(b["text"]), cfg.json_schema)


def test_generation_runs_without_autograd_and_a_schema_refuses_stop_strings(model):
    """Decoding never records a graph (a constrained run included), and stop strings, which would cut a JSON answer
    short, are refused with a schema."""
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    try:
        generate(model, model.tokenizer, ["To be"], GenerationConfig(max_new_tokens=8, do_sample=False, json_schema=SCHEMAS[2]))
        generate(model, model.tokenizer, ["To be"], GenerationConfig(max_new_tokens=4, do_sample=False))
    finally:
        handle.remove()
    assert seen and not any(seen)
    with pytest.raises(LlmkitError, match="stop strings would cut a JSON answer"):
        GenerationConfig(json_schema={"type": "object"}, stop_strings=[","]).check()


def test_bad_schemas_are_named():
    with pytest.raises(LlmkitError, match="Invalid type: nonsense"):
        check_schema({"type": "nonsense"})
    with pytest.raises(LlmkitError, match="'/nowhere' does not exist"):
        check_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(LlmkitError, match="is an object, not list"):
        check_schema([1, 2])


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    from llmkit.serve import Settings, create_app

    path = tmp_path_factory.mktemp("structured-serve")
    save_model(model, path, tokenizer=model.tokenizer)
    live = LiveServer(create_app([("tiny", str(path))], [], Settings(api_key=KEY, max_batch=8, max_queue=16)))
    live.wait_ready()
    live.tokens = lambda text: model.tokenizer.encode(text, add_special_tokens=False)
    yield live
    live.stop()


def test_response_format_in_the_openai_api(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Who are you?"}]
    schema = SCHEMAS[0]
    out = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=120,
        n=2,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    # any JSON object: nothing bounds it, so a random model could write on for ever; a bias toward '"' and "}" (applied
    # before the grammar's mask) closes strings and the object as soon as the grammar allows, and the answers parse
    close = {str(server.tokens(c)[0]): 100.0 for c in ('"', "}")}
    anything = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=200, logit_bias=close, response_format={"type": "json_object"}
    )
    assert anything.choices[0].finish_reason == "stop" and isinstance(json.loads(anything.choices[0].message.content), dict)
    kwargs = dict(model="tiny", messages=messages, max_tokens=200, temperature=0, logit_bias=close, response_format={"type": "json_object"})
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == client.chat.completions.create(**kwargs).choices[0].message.content
    json.loads(streamed)
    completion = client.completions.create(
        model="tiny", prompt="To be", max_tokens=200, logit_bias=close, extra_body={"response_format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)
    for bad, where in (
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "Invalid type"),
        ({"type": "json_schema"}, "needs json_schema"),
        ({"type": "xml"}, "response_format"),
    ):
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, response_format=bad)
        assert where in str(e.value)
    # and the server keeps serving
    ok = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    assert ok.choices[0].finish_reason == "length"


def test_generate_json_schema_on_the_command_line(tmp_path, tiny_base):
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 5}}, "required": ["word"]}
    (tmp_path / "word.json").write_text(json.dumps(schema))
    out = run_cli("generate", "--model", str(tiny_base), "--prompt", "To be", "--json-schema", str(tmp_path / "word.json"), "--seed", "2")
    jsonschema.validate(json.loads(out.stdout), schema)
    (tmp_path / "bad.json").write_text("{not json")
    bad = run_cli("generate", "--model", str(tiny_base), "--prompt", "x", "--json-schema", str(tmp_path / "bad.json"), check=False)
    assert bad.returncode != 0 and "is not JSON" in bad.stderr


# --- tool calls ----------------------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two digits",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


def test_tool_calls_are_read_from_hermes_blocks_and_bare_json_whole_or_streamed():
    """Calls in <tool_call> blocks (Hermes, Qwen2.5) or an answer that is only a call's JSON (Llama 3.1's, and a
    constrained answer); a block that does not parse, or names no tool, stays text; streamed character by character the
    same calls and the same text come out."""
    from llmkit.chat import ToolCallStream, parse_tool_calls

    names = ["get_weather", "add"]
    cases = [
        ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "Let me look.", 1),
        (
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>',
            None,
            2,
        ),
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, 1),
        ('[{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]', None, 2),
        (
            'Broken <tool_call>{"name": "add", "arguments": </tool_call> end',
            'Broken <tool_call>{"name": "add", "arguments": </tool_call> end',
            0,
        ),
        (
            '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',
            0,
        ),
        ('{"answer": 42}', '{"answer": 42}', 0),
        ("A plain < answer with <tool_ and <tool_call in it", "A plain < answer with <tool_ and <tool_call in it", 0),
        ('Checking. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}', "Checking.", 1),  # a last block left open
    ]
    for text, content, n in cases:
        got_content, calls = parse_tool_calls(text, names)
        assert got_content == content and len(calls) == n, text
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
        stream = ToolCallStream(names)
        pieces, streamed_calls = [], []
        for ch in text:
            piece, found = stream.push(ch)
            pieces.append(piece)
            streamed_calls += found
        piece, found = stream.end()
        pieces.append(piece)
        streamed_calls += found
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in calls], text
        assert "".join(pieces).strip() == (content or ""), text
    text_with_brackets = ToolCallStream(names)  # an answer that starts with a bracket but is no call streams
    assert text_with_brackets.push("[1] is the first") == ("[1] is the first", [])
    from llmkit.chat import call_schema

    open_params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    forced = call_schema([{"type": "function", "function": {"name": "f", "parameters": open_params}}])
    assert forced["properties"]["arguments"]["additionalProperties"] is False  # as OpenAI's strict mode reads it


QWEN_LIKE = (  # the shape of Qwen2.5's template: tools in the system turn, calls and results by the template itself
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{% for c in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_tools_go_through_the_models_template_or_the_hermes_form(model):
    """A template that takes `tools` writes them, the calls (their arguments as objects, as transformers passes them)
    and the results; one that does not (llmkit's default) is given the Hermes form: the tools in the system message,
    each call in <tool_call> tags, each result a user turn in <tool_response> tags."""
    from llmkit.chat import TOOL_SYSTEM, render_chat

    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    own = render_chat(model.tokenizer, messages, template=QWEN_LIKE, tools=TOOLS)
    assert json.dumps(TOOLS[1], ensure_ascii=False) in own
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in own
    assert "<tool_response>\n3\n</tool_response>" in own and own.endswith("<|im_start|>assistant")
    hermes = render_chat(model.tokenizer, messages, tools=TOOLS)  # llmkit's default template has no tools
    assert TOOL_SYSTEM.split("\n")[0] in hermes and '"name": "get_weather"' in hermes
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in hermes
    assert "<|user|>\n<tool_response>\n3\n</tool_response>" in hermes


def test_the_openai_clients_tool_loop(server):
    """tool_choice "required" or a named function: the answer is constrained to one call of the tools' schemas, read
    into message.tool_calls with finish_reason "tool_calls", streamed as the client accumulates it; the call and its
    result go back in the conversation and the server answers; bad tool requests are 400s and it keeps serving."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Oslo, and what is 2 + 3?"}]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    named = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=60,
        n=2,
        seed=5,
    )
    for c in named.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "add"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), params["add"])
    # streamed: the same call, in the deltas the client accumulates
    deltas = list(
        client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0, stream=True
        )
    )
    streamed = [tc for d in deltas if d.choices for tc in (d.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in streamed] == [(0, call.function.name, call.function.arguments)]
    assert [d.choices[0].finish_reason for d in deltas if d.choices and d.choices[0].finish_reason] == ["tool_calls"]
    # the loop: the call and its result back to the model, which answers
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "12 degrees"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=6, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls") and answer.usage.prompt_tokens > out.usage.prompt_tokens
    for bad, where in (
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not one of the tools"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], tool_choice="required"),
            "a tool's parameters",
        ),
        (dict(tools=TOOLS, tool_choice="required", stop=["}"]), "drop stop"),
    ):
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=10, **bad)
        assert where in str(e.value)
    with pytest.raises(BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="tiny", messages=[*messages[:1], {"role": "tool", "content": "x"}], max_tokens=5)
    ok = client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=5)
    assert ok.choices[0].finish_reason == "length"
