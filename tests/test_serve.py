"""Serving: the engine's continuous batching equals each request decoded alone; the OpenAI-compatible server answers the
official `openai` client (chat, completions, streaming with usage, embeddings equal to sentence-transformers, errors as
`openai` exceptions), survives bad input, bounds its queue (429), frees the slot of a client that leaves, and
`llmkit serve` shuts down cleanly on SIGTERM.

The servers start once per module (one per settings), on free local ports, in this process (a thread) so the tests can
watch the engine; one test runs the real command in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from llmkit.chat import chat_prompt_ids
from llmkit.generate import GenerationConfig, generate
from llmkit.model import build_model, preset
from llmkit.model.weights import save_model
from llmkit.serve import Engine, Request, Settings, create_app

from conftest import KEY, LiveServer, engine_results, free_port, get, request, run_cli, served_model, wait_healthy

pytestmark = pytest.mark.xdist_group("serve")  # one worker starts these servers, not both


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizers_by_kind):
    path = tmp_path_factory.mktemp("tiny-serve")
    save_model(served_model(tokenizers_by_kind["byte-bpe"]), path, tokenizer=tokenizers_by_kind["byte-bpe"])
    return path


@pytest.fixture(scope="module")
def server(tiny_dir):
    """SmolLM2 and a tiny decoder, MiniLM for embeddings, an API key; 16 running, 32 waiting."""
    app = create_app(
        [("smollm2", "smollm2"), ("tiny", str(tiny_dir))],
        [("minilm", "minilm")],
        Settings(api_key=KEY, max_batch=16, max_queue=32, max_body=64 * 1024, cors_origins=["http://localhost:3000"]),
    )
    live = LiveServer(app)
    live.wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


# --- the engine alone ---------------------------------------------------------------------------------------------------


def _served(model, jobs, *, stagger: float = 0.0, max_batch: int = 3, max_queue: int = 0) -> list[dict]:
    """`jobs` through an engine of their own (closed after)."""
    engine = Engine(model, "test", max_batch=max_batch, max_queue=max_queue)
    try:
        return engine_results(engine, jobs, stagger=stagger)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "kind,overrides,static",
    [("tiny-llama", {}, False), ("tiny-gpt", {}, False), ("tiny-llama", {"position": "relative"}, False), ("tiny-llama", {}, True)],
)
def test_continuous_batching_equals_each_request_alone(tokenizers_by_kind, kind, overrides, static):
    """Requests of many lengths join and leave a batch of 4 at different steps (prompts longer than the running rows
    move them right; the timeline is shifted and grown): greedy and seeded sampled outputs equal each decoded alone.
    `static`: the engine decodes with the static-cache step the compiler takes (rows padded to a power of two), run
    eagerly here (tests/test_fast_decode.py compiles it)."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok, kind, max_seq_len=256, **overrides)
    g = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(14):
        prompt = torch.randint(10, tok.vocab_size, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
        n = int(torch.randint(1, 60, (1,), generator=g))
        cfg = (
            GenerationConfig(max_new_tokens=n, do_sample=False)
            if i % 2 == 0
            else GenerationConfig(max_new_tokens=n, temperature=0.9, top_k=40, seed=i, repetition_penalty=1.1 if i % 3 else 1.0)
        )
        cfg.stop_token_ids = []  # run to max_new_tokens: the longest overlaps
        jobs.append((prompt, cfg))
    alone = [generate(model, tok, [p], c)[0] for p, c in jobs]
    if static:  # the engine only: each request alone above ran the plain eager model
        model.compiled_decode = "eager"
    engine = Engine(model, kind, max_batch=4, max_queue=20)
    try:
        together = engine_results(engine, jobs, stagger=0.01)
    finally:
        engine.close()
    for (prompt, cfg), a, b in zip(jobs, alone, together):
        assert b["ids"] == a.ids and b["text"] == a.text, (len(prompt), cfg)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": cfg.max_new_tokens, "cached_tokens": 0}  # no shared starts
        assert b["end"] == ("done", "length", usage)
    assert engine.running == 0 and engine.queued == 0


def test_metrics_say_which_compiled_steps_are_in_use_and_which_still_build(tokenizers_by_kind):
    """/metrics' llmkit_compiled_decode_steps: the steps the engine decodes with, and those a background process still
    builds (the engine serves eagerly meanwhile); a step that failed to compile is neither."""
    from llmkit.model.compiled import CompileJob
    from llmkit.serve.metrics import Metrics

    metrics = Metrics()
    engine = Engine(served_model(tokenizers_by_kind["byte-bpe"]), "c", max_batch=4, metrics=metrics)
    try:
        ready, building, failed = CompileJob(1), CompileJob(2), CompileJob(4)
        ready.ready.set(), ready.done.set(), failed.done.set()
        engine.jobs.update({1: ready, 2: building, 4: failed})
        engine._gauges()
        text = metrics.text().decode()
        assert 'llmkit_compiled_decode_steps{model="c",state="in_use"} 1.0' in text
        assert 'llmkit_compiled_decode_steps{model="c",state="building"} 1.0' in text
    finally:
        engine.jobs.clear()
        engine.close()


def test_stop_strings_and_tokens_end_each_row_as_alone(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("To be, or not to be", "Friends, Romans", "O Romeo")]
    free = [generate(model, tok, [p], GenerationConfig(max_new_tokens=20, do_sample=False, stop_token_ids=[]))[0] for p in prompts]
    jobs = [
        (prompts[0], GenerationConfig(max_new_tokens=20, do_sample=False, stop_strings=[free[0].text[5:8]], stop_token_ids=[])),
        (prompts[1], GenerationConfig(max_new_tokens=20, do_sample=False, stop_token_ids=[free[1].ids[6]])),
        (prompts[2], GenerationConfig(max_new_tokens=20, do_sample=False, stop_token_ids=[])),
    ]
    out = _served(model, jobs)
    for (p, cfg), o in zip(jobs, out):
        a = generate(model, tok, [p], cfg)[0]
        assert (o["text"], o["ids"], o["end"][1]) == (a.text, a.ids, a.finish_reason)
    assert out[0]["end"][1] == "stop" and out[1]["end"][1] == "stop" and out[2]["end"][1] == "length"


# --- the HTTP API ---------------------------------------------------------------------------------------------------


def test_models_chat_and_completions_through_the_openai_client(server, client):
    assert {m.id for m in client.models.list().data} == {"smollm2", "tiny", "minilm"}
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=24
    )
    assert r.object == "chat.completion" and r.model == "smollm2" and r.id.startswith("chatcmpl-") and r.created > 0
    assert "4" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    tok = server.app.state.llmkit.models["smollm2"].tok
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is 2+2?"}])
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # completions: several prompts x n choices, in OpenAI's order; a length finish is reported as one
    r = client.completions.create(model="smollm2", prompt=["Once upon a time", "The sky is"], max_tokens=6, temperature=0, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in r.choices)
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text
    alone = generate(
        server.app.state.llmkit.models["smollm2"].model, tok, ["The sky is"], GenerationConfig(max_new_tokens=6, do_sample=False)
    )[0]
    assert r.choices[2].text == alone.text and r.usage.completion_tokens == 24
    lp = r.choices[2].logprobs
    assert "".join(lp.tokens) == alone.text and len(lp.token_logprobs) == 6 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(p) for t, p in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the best


def test_chat_streams_with_usage_and_equals_the_generate_command(server, client):
    question = "Name a color of the sky."
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0 and len(finish) == 1
    out = run_cli(
        "generate", "--model", "smollm2", "--chat", "--greedy", "--prompt", question, "--max-new-tokens", "24", "--quantize", "none"
    ).stdout  # the server's weights (float32, as the command's default)
    assert text == out[:-1]  # the command ends the text with a newline
    # logprobs of a chat answer: each token with its bytes and its best alternatives
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3, logprobs=True, top_logprobs=3
    )
    first = r.choices[0].logprobs.content[0]
    assert bytes(first.bytes).decode() == first.token and first.top_logprobs[0].token == first.token and len(first.top_logprobs) == 3


def test_embeddings_equal_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    from llmkit.embedded import embedded_path

    texts = ["The cat sat on the mat.", "A dog barked at the mailman all morning long."]
    theirs = SentenceTransformer(str(embedded_path("minilm")), device="cpu").encode(texts)
    r = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), theirs, atol=2e-5)
    b = client.embeddings.create(model="minilm", input=texts[0], encoding_format="base64")
    raw = b.data[0].embedding
    vector = np.frombuffer(base64.b64decode(raw), dtype=np.float32) if isinstance(raw, str) else np.array(raw)
    np.testing.assert_allclose(vector, theirs[0], atol=2e-5)


def test_errors_have_openai_shape_and_the_server_keeps_serving(server, client):
    import openai

    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=user)
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user, extra_body={"audio": {"voice": "alloy"}})
    assert e.value.body["param"] == "audio" and "does not support" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "to be " * 700}], max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "to be " * 700}], max_tokens=5, extra_body={"truncate_prompt_tokens": -1}
    )  # opted in: the prompt's end is kept
    assert r.usage.prompt_tokens == 1024 - 4 and r.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x")
    with pytest.raises(openai.AuthenticationError):
        type(client)(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
    status, body, _ = request("POST", server.base + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = request("POST", server.base + "/v1/chat/completions", b"{" + b" " * 70_000 + b"}")
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body, _ = request("POST", server.base + "/v1/chat/completions", {"model": "tiny", "messages": user}, key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body, _ = request("GET", server.base + "/v1/nothing")
    assert status == 404 and "error" in body
    # a chunked body (no Content-Length) over the limit is cut off while it is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=iter([b"{" + b" " * 40_000] * 3),
        encode_chunked=True,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"},
    )
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "body_too_large"
    conn.close()
    status, body, _ = request("POST", server.base + "/v1/chat/completions", b"model=tiny", headers={"Content-Type": "text/plain"})
    assert status == 400 and "JSON object" in body["error"]["message"]
    # a seed beyond 64 bits is refused before it reaches the engine (where it would fail the whole batch)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user, seed=2**64, temperature=0.7)
    assert e.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=user, stream_options={"include_usage": True})  # without stream
    # CORS for the allowed origin, with the headers the openai JS client sends
    status, _, headers = request(
        "OPTIONS",
        server.base + "/v1/chat/completions",
        key=None,
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
        },
    )
    assert status == 200 and headers.get("access-control-allow-origin") == "http://localhost:3000"
    status, _, headers = request(
        "OPTIONS",
        server.base + "/v1/chat/completions",
        key=None,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert headers.get("access-control-allow-origin") is None
    assert get(server.base + "/health", key=None)[0] == 200  # public
    # still serving, and the metrics saw it all
    assert client.chat.completions.create(model="tiny", messages=user, max_tokens=3, temperature=0).choices[0].finish_reason
    status, text, _ = get(server.base + "/metrics")
    assert status == 200 and 'llmkit_errors_total{kind="too_large"}' in text and 'llmkit_errors_total{kind="auth"}' in text
    assert 'llmkit_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "llmkit_time_to_first_token_seconds_count" in text and 'llmkit_running_batch_size{model="tiny"}' in text


def test_what_a_hostile_client_sends_is_a_400_and_health_checks_and_metrics_see_the_truth(server):
    """Lone surrogates anywhere, a logit_bias key that only looks like a number, a Host name the server does not answer
    to: each a 400 naming it; HEAD on / and /health (health checkers) is 200; /v1/models gives an embedding model's
    real input limit; a stream the client abandons counts as 499 in /metrics, not 200."""
    chat = server.base + "/v1/chat/completions"
    for body, where in [
        ({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]}, "stop.0"),
    ]:
        status, answer, _ = request("POST", chat, json.dumps(body).encode())  # json escapes a lone surrogate: "\ud800"
        assert status == 400 and "lone surrogate" in answer["error"]["message"] and where in answer["error"]["message"], answer
    for url, body in [
        (server.base + "/v1/embeddings", {"model": "minilm", "input": "x\ud800"}),
        (server.base + "/tokenize", {"model": "tiny", "prompt": "\ud800"}),
        (server.base + "/v1/completions", {"model": "tiny", "prompt": "\ud800"}),
    ]:
        assert request("POST", url, json.dumps(body).encode())[0] == 400
    status, answer, _ = request("POST", chat, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"²": 5}})
    assert status == 400 and answer["error"]["param"] == "logit_bias"
    status, answer, _ = request("GET", server.base + "/v1/models", headers={"Host": "evil.example:8000"})
    assert status == 400 and answer["error"]["code"] == "host_not_allowed"
    assert request("GET", server.base.replace("127.0.0.1", "localhost") + "/health", key=None)[0] == 200
    for path in ("/health", "/"):
        assert request("HEAD", server.base + path, key=None)[0] == 200, path
    cards = {m["id"]: m for m in get(server.base + "/v1/models")[1]["data"]}
    assert cards["minilm"]["max_model_len"] == 256 and cards["tiny"]["max_model_len"] == 1024
    assert cards["smollm2"]["default_max_tokens"] == 1024 and "default_max_tokens" not in cards["minilm"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 900, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # the client leaves mid-stream
    deadline = time.monotonic() + 30
    while 'llmkit_requests_total{route="/v1/completions",status="499"}' not in get(server.base + "/metrics")[1]:
        assert time.monotonic() < deadline, "the abandoned stream was never counted as cancelled"
        time.sleep(0.2)


def test_tokenize_and_detokenize(server):
    status, body, _ = request("POST", server.base + "/tokenize", {"model": "smollm2", "prompt": "Hello world"})
    tok = server.app.state.llmkit.models["smollm2"].tok
    assert status == 200 and body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    status, body, _ = request("POST", server.base + "/detokenize", {"model": "smollm2", "tokens": body["tokens"]})
    assert status == 200 and body["prompt"] == "Hello world"
    assert request("POST", server.base + "/detokenize", {"model": "smollm2", "tokens": [10**9]})[0] == 400


def test_32_concurrent_streams_all_complete_and_equal_their_single_runs(server):
    from openai import AsyncOpenAI

    def settings(i: int) -> dict:
        base = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"Speak line {i} of the play, " + "friend " * (i % 7)}],
            "max_tokens": 4 + (i * 5) % 37,
            "extra_body": {"ignore_eos": i % 4 != 0},
        }
        if i % 2:
            base.update(temperature=0.8, top_p=0.9, seed=100 + i, presence_penalty=0.3 * (i % 3))
        else:
            base.update(temperature=0)
        return base

    async def one(c, i: int, stream: bool):
        if not stream:
            r = await c.chat.completions.create(**settings(i))
            return r.choices[0].message.content, r.choices[0].finish_reason
        s = await c.chat.completions.create(**settings(i), stream=True, stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        async for chunk in s:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        assert usage is not None
        return "".join(parts), finish

    async def run():
        c = AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
        alone = [await one(c, i, stream=False) for i in range(32)]
        together = await asyncio.gather(*(one(c, i, stream=True) for i in range(32)))
        await c.close()
        return alone, together

    alone, together = asyncio.run(run())
    assert len(together) == 32 and all(f in ("stop", "length") for _, f in together)
    assert together == alone  # greedy and seeded sampled: the batch changes nothing
    # a row leaves the batch just after its last event is sent: the engine empties within a step or two of the clients
    engine, deadline = server.engine("tiny"), time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.queued == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    engine = server.engine("tiny")
    before = server.app.state.llmkit.metrics.tokens.labels("tiny")._value.get()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    assert engine.running == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while engine.running:
        assert time.monotonic() < deadline, "the row of a client that left kept running"
        time.sleep(0.02)
    generated = server.app.state.llmkit.metrics.tokens.labels("tiny")._value.get() - before
    assert generated < 1000  # cancelled, not run to the end


@pytest.fixture(scope="module")
def busy_server(tiny_dir, monkeypatch_module):
    """One running slot, one queue place; its model loads only when the test lets it (to see /health say 503)."""
    from llmkit.model import weights

    gate = threading.Event()
    real = weights.load

    def slow_load(spec, **kw):
        gate.wait(60)
        return real(spec, **kw)

    monkeypatch_module.setattr(weights, "load", slow_load)
    live = LiveServer(create_app([("tiny", str(tiny_dir))], [], Settings(max_batch=1, max_queue=1)))
    live.gate = gate
    yield live
    gate.set()
    live.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loading_is_503_then_a_full_queue_is_429_and_the_rest_succeed(busy_server):
    status, body, _ = get(busy_server.base + "/health", key=None)
    assert status == 503 and body["status"] == "loading"
    status, body, headers = request("POST", busy_server.base + "/v1/completions", {"model": "tiny", "prompt": "hi"}, key=None)
    assert status == 503 and body["error"]["code"] == "loading" and headers.get("retry-after") == "5"
    busy_server.gate.set()
    busy_server.wait_ready()
    body = {"model": "tiny", "prompt": "To be, or not", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    results = [None] * 6

    def send(i):
        results[i] = request("POST", busy_server.base + "/v1/completions", body, key=None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 429, 429, 429, 429]  # one runs, one waits, the rest are refused at once
    refused = next(r for r in results if r[0] == 429)
    assert refused[1]["error"]["type"] == "rate_limit_error" and int(refused[2]["retry-after"]) >= 1
    status, body, _ = request("POST", busy_server.base + "/v1/completions", {**body, "n": 3}, key=None)
    assert status == 400 and body["error"]["param"] == "n"  # more than slots and queue together: never 429
    ok = [r for r in results if r[0] == 200]
    assert all(r[1]["choices"][0]["finish_reason"] == "length" and r[1]["usage"]["completion_tokens"] == 1000 for r in ok)
    assert ok[0][1]["choices"][0]["text"] == ok[1][1]["choices"][0]["text"]


def test_the_serve_command_needs_its_key_and_stops_cleanly_on_sigterm(tiny_dir, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkit",
            "serve",
            "--model",
            f"tiny={tiny_dir}",
            "--port",
            str(port),
            "--api-key-file",
            str(key_file),
            "--max-batch",
            "2",
            "--log-level",
            "warning",
            "--shutdown-timeout",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        assert get(base + "/v1/models", key=None)[0] == 401
        assert get(base + "/v1/models")[1]["data"][0]["id"] == "tiny"
        # SIGTERM while two streams run: the short one finishes; the one that outlasts the grace period (--shutdown-timeout
        # 5: sixteen choices of a whole context each) ends with an error event and [DONE], never a cut connection
        streams = []
        for max_tokens, n in ((20, 1), (1000000, 16)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"model": "tiny", "prompt": "To be", "max_tokens": max_tokens, "n": n, "ignore_eos": True, "stream": True}
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
            conn.request("POST", "/v1/completions", json.dumps(body), headers)
            response = conn.getresponse()
            streams.append((response, response.readline()))
        os.kill(proc.pid, signal.SIGTERM)
        (short, first), (long, _) = streams
        rest = short.read().decode()
        assert first.startswith(b"data: ") and rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        rest = long.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"code": "shutdown"' in rest, rest[-500:]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_encoder_decoder_is_served_one_request_at_a_time_as_generate_does(tokenizers_by_kind):
    tok = tokenizers_by_kind["unigram"]
    torch.manual_seed(0)
    t5 = build_model(preset("tiny-t5", vocab_size=tok.vocab_size, d_model=64, n_heads=4, d_ff=128)).eval()
    t5.tokenizer = tok
    prompts = [tok.encode(t) for t in ("To be, or not to be", "Friends, Romans, countrymen")]
    jobs = [(p, GenerationConfig(max_new_tokens=12, do_sample=False)) for p in prompts]
    out = _served(t5, jobs, max_batch=2, max_queue=4)
    for (p, cfg), o in zip(jobs, out):
        a = generate(t5, tok, [p], cfg)[0]
        assert (o["text"], o["end"][1]) == (a.text, a.finish_reason)


def test_logit_bias_bans_and_forces_tokens_per_row(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok)
    prompt = tok.encode("To be, or not to be", add_special_tokens=False)
    free = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=6, do_sample=False, stop_token_ids=[]))[0]
    banned = GenerationConfig(max_new_tokens=6, do_sample=False, stop_token_ids=[], logit_bias={free.ids[0]: -100})
    forced = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[], logit_bias={77: 100})
    out = _served(model, [(prompt, banned), (prompt, forced)])
    assert out[0]["ids"][0] != free.ids[0] and out[0]["ids"] == generate(model, tok, [prompt], banned)[0].ids
    assert out[1]["ids"] == [77] * 6
    with pytest.raises(Exception, match="not in \\[-100, 100\\]"):
        GenerationConfig(logit_bias={1: 300}).check()


def test_a_prompt_whose_prefill_fails_fails_alone(tokenizers_by_kind):
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok)
    prompt = tok.encode("To be, or not to be", add_special_tokens=False)
    engine = Engine(model, "t", max_batch=4, max_queue=4)
    try:
        out = engine_results(
            engine,
            [
                (prompt, GenerationConfig(max_new_tokens=150, do_sample=False, stop_token_ids=[])),
                ([10**6], GenerationConfig(max_new_tokens=5)),
            ],
            stagger=0.05,
        )
        assert out[1]["end"][0] == "error" and "could not be processed" in out[1]["end"][2]
        assert out[0]["end"][:2] == ("done", "length") and len(out[0]["ids"]) == 150
        again = engine_results(engine, [(prompt, GenerationConfig(max_new_tokens=5, do_sample=False, stop_token_ids=[]))])
        assert again[0]["ids"] == out[0]["ids"][:5]  # the engine goes on
    finally:
        engine.close()


_RELEASE_SCRIPT = """
import json, os, threading, time, torch
from llmkit.threads import release_openmp_threads

torch.set_num_threads(2)

def tids():
    return set(os.listdir("/proc/self/task"))

out = {}

def work():  # on a thread of its own, as the load thread or the embedding pool's
    before = tids()
    torch.randn(2_000_000).exp_()  # a parallel region: this thread's team gets its worker
    workers = tids() - before
    out["released"] = release_openmp_threads()
    for _ in range(100):  # the kernel forgets a joined thread a moment later
        if workers - tids():
            break
        time.sleep(0.01)
    out["workers"], out["left"] = sorted(workers), sorted(workers & tids())

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(out))
"""


def test_release_openmp_threads_lets_the_calling_threads_workers_go():
    """The engine's creator and the embedding thread free their idle OpenMP workers (alive, they outnumber the cores and
    libgomp puts every team's workers to sleep between kernels: the engine's decode step ran 2.8x slower). In a process
    of its own with two OpenMP threads: the suite's workers run one."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["released"] and set(out["workers"]) - set(out["left"]), out  # the OpenMP worker is gone (others stay)


def test_a_poisoned_request_fails_alone_and_the_batch_goes_on(tokenizers_by_kind, monkeypatch):
    """Eight streams run; requests that fail in the middle of them (NaN scores from the model, a stop rule that raises,
    settings at the edge of what a sampler computes: temperature 1e-40, top_k 10**30) end alone, and the eight finish
    exactly as each does alone."""
    import llmkit.serve.engine as engine_module
    from llmkit.generate import TextStream

    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok, max_seq_len=256)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, tok.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    jobs = []
    for i, p in enumerate(prompts):
        cfg = GenerationConfig(max_new_tokens=30, do_sample=i % 2 == 1, temperature=0.8, seed=i)
        cfg.stop_token_ids = []
        jobs.append((p, cfg))
    alone = [generate(model, tok, [p], c)[0] for p, c in jobs]

    nan_marker, raise_marker = 7, 8  # a prompt ending in 7 gets NaN scores; one ending in 8 has a stop rule that raises
    real_forward = model.forward

    def forward(ids, *args, **kwargs):
        out = real_forward(ids, *args, **kwargs)
        if ids.shape[1] > 1:  # a prefill
            out[ids[:, -1] == nan_marker] = float("nan")
        return out

    class Failing(TextStream):
        def push(self, token_id):
            if self.prompt_ids and self.prompt_ids[-1] == raise_marker and len(self.ids) >= 3:
                raise RuntimeError("a stop rule failed")
            return super().push(token_id)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(engine_module, "TextStream", Failing)
    poison = [
        ([11, 12, nan_marker], GenerationConfig(max_new_tokens=30, do_sample=False)),
        ([11, 12, raise_marker], GenerationConfig(max_new_tokens=30, do_sample=False)),
        ([11, 13], GenerationConfig(max_new_tokens=30, temperature=1e-40, seed=1)),  # greedy: below SAMPLING_EPS
        ([11, 14], GenerationConfig(max_new_tokens=30, temperature=0.7, top_k=10**30, seed=2)),  # top-k = the vocabulary
    ]
    mixed = jobs[:3] + poison[:2] + jobs[3:6] + poison[2:] + jobs[6:]
    engine = Engine(model, "poison", max_batch=12, max_queue=20)
    try:
        out = engine_results(engine, mixed, stagger=0.02)
    finally:
        engine.close()
    results = out[:3] + out[5:8] + out[10:]
    for (p, cfg), a, b in zip(jobs, alone, results):
        assert b["ids"] == a.ids and b["text"] == a.text and b["end"][:2] == ("done", "length"), (len(p), cfg)
    nan_row, raise_row, tiny_t, huge_k = out[3], out[4], out[8], out[9]
    assert nan_row["end"][:2] == ("error", "server_error") and "not numbers" in nan_row["end"][2]
    assert raise_row["end"][:2] == ("error", "server_error") and "a stop rule failed" in raise_row["end"][2]
    greedy = generate(model, tok, [[11, 13]], GenerationConfig(max_new_tokens=30, do_sample=False))[0]
    assert tiny_t["end"][:2] == ("done", "length") and tiny_t["ids"] == greedy.ids
    assert huge_k["end"][:2] == ("done", "length") and len(huge_k["ids"]) == 30


def test_chunked_prefill_equals_each_request_alone_and_keeps_streams_moving(tokenizers_by_kind):
    """Prompts prefilled 7 columns at a time, between decode steps of the running rows (one and several prompts
    joining, padded): greedy and seeded outputs equal each request decoded alone; a stream that runs while a long
    prompt is prefilled gets tokens between its chunks."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok, max_seq_len=256)
    g = torch.Generator().manual_seed(5)
    jobs = []
    for i in range(8):
        prompt = torch.randint(10, tok.vocab_size, (int(torch.randint(1, 70, (1,), generator=g)),), generator=g).tolist()
        cfg = GenerationConfig(max_new_tokens=int(torch.randint(5, 40, (1,), generator=g)), do_sample=i % 2 == 1, temperature=0.9, seed=i)
        cfg.stop_token_ids = []
        jobs.append((prompt, cfg))
    alone = [generate(model, tok, [p], c)[0] for p, c in jobs]
    engine = Engine(model, "chunked", max_batch=4, max_queue=20, prefill_chunk=7)
    try:
        together = engine_results(engine, jobs, stagger=0.01)
        # one stream runs; a 150-token prompt joins: the stream's tokens keep coming while the prompt is prefilled
        times: list[float] = []
        done = threading.Event()

        def emit(event):
            if event[0] == "token":
                times.append(time.monotonic())
            else:
                done.set()

        running = GenerationConfig(max_new_tokens=60, do_sample=False, stop_token_ids=[])
        engine.submit([Request([11, 12, 13], running, emit)])
        while len(times) < 3:
            time.sleep(0.001)
        long_prompt = torch.randint(10, tok.vocab_size, (150,), generator=g).tolist()
        first: list[float] = []
        long_done = threading.Event()
        ids: list[int] = []

        def emit_long(event):
            if event[0] == "token":
                first.append(time.monotonic())
                ids.append(event[2])
            else:
                long_done.set()

        submitted = time.monotonic()
        engine.submit([Request(long_prompt, GenerationConfig(max_new_tokens=2, do_sample=False, stop_token_ids=[]), emit_long)])
        assert long_done.wait(60) and done.wait(60)
    finally:
        engine.close()
    for (prompt, cfg), a, b in zip(jobs, alone, together):
        assert b["ids"] == a.ids and b["text"] == a.text, (len(prompt), cfg)
    assert ids == generate(model, tok, [long_prompt], GenerationConfig(max_new_tokens=2, do_sample=False, stop_token_ids=[]))[0].ids
    during = [t for t in times if submitted < t < first[0]]
    assert len(times) == 60 and len(during) >= 10, len(during)  # 22 chunks of 7: a decode step between each two


def test_the_prefix_cache_reuses_earlier_prompts_and_answers_and_changes_no_token(tokenizers_by_kind):
    """A shared system prompt, then a conversation's next turn (its prompt + the answer + a new message): each is
    prefilled only from where it differs (cached_tokens says how much was reused), and every greedy and seeded answer
    equals the same request in an engine without the cache, and `generate` alone."""
    tok = tokenizers_by_kind["byte-bpe"]
    model = served_model(tok, max_seq_len=512)
    g = torch.Generator().manual_seed(9)
    system = torch.randint(10, tok.vocab_size, (120,), generator=g).tolist()
    questions = [torch.randint(10, tok.vocab_size, (int(n),), generator=g).tolist() for n in (5, 17, 30)]
    cfgs = [GenerationConfig(max_new_tokens=12, do_sample=i == 1, temperature=0.8, seed=i, stop_token_ids=[]) for i in range(3)]
    results = {}
    for mb in (64, 0):
        engine = Engine(model, f"prefix-{mb}", max_batch=4, max_queue=8, prefill_chunk=32, prefix_cache_mb=mb)
        try:
            first = engine_results(engine, [(system + questions[0], cfgs[0])])[0]
            # one by one (a lone prompt reuses the cache): the same system prompt, other questions
            shared = [engine_results(engine, [(system + q, c)])[0] for q, c in zip(questions[1:], cfgs[1:])]
            # the conversation goes on: prompt + answer + a new question
            turn = system + questions[0] + first["ids"] + questions[2]
            second = engine_results(engine, [(turn, cfgs[0])])[0]
            results[mb] = (first, shared, second)
        finally:
            engine.close()
    (first, shared, second), (first0, shared0, second0) = results[64], results[0]
    assert first["ids"] == first0["ids"] and [s["ids"] for s in shared] == [s["ids"] for s in shared0] and second["ids"] == second0["ids"]
    assert first["end"][2]["cached_tokens"] == 0 and first0["end"][2]["cached_tokens"] == 0
    assert [s["end"][2]["cached_tokens"] for s in shared] == [len(system)] * 2  # the system prompt was reused
    # the whole first exchange but its last answer token (sampled, never fed): len(system) + 5 + 12 - 1
    assert second["end"][2]["cached_tokens"] == len(system) + len(questions[0]) + len(first["ids"]) - 1
    assert second0["end"][2]["cached_tokens"] == 0
    for (prompt, cfg), got in zip(((system + questions[1], cfgs[1]), (turn, cfgs[0])), (shared[0], second)):
        assert got["ids"] == generate(model, tok, [prompt], cfg)[0].ids
    # requests that arrive together: each whose start is cached joins alone and reuses it
    engine = Engine(model, "prefix-burst", max_batch=4, max_queue=8, prefill_chunk=32)
    try:
        engine_results(engine, [(system + questions[0], cfgs[0])])
        burst = engine_results(engine, [(system + q, cfgs[0]) for q in questions])
    finally:
        engine.close()
    assert [b["end"][2]["cached_tokens"] for b in burst] == [len(system) + len(questions[0]) - 1, len(system), len(system)]


def test_the_prefix_cache_is_bounded_and_keeps_the_longest_start():
    from llmkit.model.prefix import PrefixCache

    kv = lambda n: ([torch.full((2, n, 4), float(n))], [torch.full((2, n, 4), -float(n))])  # noqa: E731  (one layer)
    per_token = 2 * 2 * 4 * 4  # k and v, 2 heads x 4 features, float32
    cache = PrefixCache(max_bytes=100 * per_token, min_tokens=4)
    a = list(range(40))
    cache.add(a, *kv(40))
    assert cache.lookup(a + [99])[0] == 40 and cache.lookup(a)[0] == 39  # at most all but the last token
    assert cache.lookup([1, 2, 3]) is None and cache.lookup(list(range(3)) + [77] * 10) is None  # below min_tokens
    cache.add(a + list(range(100, 120)), *kv(60))  # a longer entry takes the shorter one's place (it starts with it)
    assert len(cache.entries) == 1 and cache.bytes == 60 * per_token
    n, ks, vs = cache.lookup(a + list(range(100, 110)) + [5])
    assert n == 50 and ks[0].shape == (2, 50, 4) and float(ks[0][0, 0, 0]) == 60.0
    cache.add(list(range(200, 250)), *kv(50))  # 110 tokens > 100: the least recently used goes
    assert list(cache.entries) == [tuple(range(200, 250))] and cache.bytes == 50 * per_token
    cache.add(list(range(200, 250)) + list(range(500, 560)), *kv(110))  # over the bound alone: refused, nothing lost
    assert list(cache.entries) == [tuple(range(200, 250))] and cache.longest(list(range(200, 260))) == 50


def test_cached_tokens_in_the_usage_as_openai_reports_them(server, client):
    """Two requests with one long system prompt: the second reports the reused tokens in usage.prompt_tokens_details
    (streamed with include_usage too) and answers as the first did."""
    system = {"role": "system", "content": "You are a careful assistant who answers in one short line. " * 6}
    kwargs = dict(model="tiny", max_tokens=8, temperature=0)
    first = client.chat.completions.create(messages=[system, {"role": "user", "content": "Hello there"}], **kwargs)
    again = client.chat.completions.create(messages=[system, {"role": "user", "content": "Hello there"}], **kwargs)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 20 > 16
    chunks = list(
        client.chat.completions.create(
            messages=[system, {"role": "user", "content": "Something else"}], stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 16
