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
    return served_model(tokenizers_by_kind["byte-bpe"], max_seq_len=512)


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
