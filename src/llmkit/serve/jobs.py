"""A request's way through the engine: its prompt fitted to the context, its sampling settings, the engine requests
it becomes (`Job`), and the answer they send back, whole or streamed as server-sent events (OpenAI's shapes)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmkit.chat import ToolCallStream, chat_prompt_ids, parse_tool_calls
from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, constraint_for, stop_rules
from llmkit.grammar import check_schema
from llmkit.serve.engine import QueueFull, ShuttingDown, TooMany
from llmkit.serve.engine import Request as EngineRequest
from llmkit.serve.protocol import ChatRequest, error_body
from llmkit.serve.state import APIError, Served, State
from llmkit.tokenizer.pretrained import bytes_to_unicode

log = logging.getLogger("llmkit.serve")

BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}  # GPT-2's byte-level alphabet, reversed


def token_info(served: Served, token_id: int, logprob: float) -> dict:
    """{"token", "logprob", "bytes"} of one token, as OpenAI reports it (bytes: the token's own UTF-8 bytes, which
    may be part of a character)."""
    text = served.tok.decode([token_id], strict=False)
    piece = served.tok.backend.id_to_token(token_id) or ""
    if served.byte_level and piece and all(c in BYTE_DECODER for c in piece):
        raw = [BYTE_DECODER[c] for c in piece]
    elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        raw = [int(piece[3:5], 16)]
    else:
        raw = list(text.encode("utf-8"))
    return {"token": text, "logprob": logprob, "bytes": raw}


def fit(
    served: Served, ids: list[int], requested: int | None, default: int | None, truncate: int | None, param: str
) -> tuple[list[int], int]:
    """(prompt ids, new tokens): the prompt checked against the context (or cut, when the request asks), and max_tokens
    capped by the room left (the last new token is never fed back: P + N - 1 positions)."""
    C = served.context
    if truncate is not None and truncate != 0:
        reserve = requested if requested is not None else (default if default is not None else min(256, C // 4))
        keep = truncate if truncate > 0 else max(C - max(reserve - 1, 0), 1)
        ids = ids[-keep:]
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    limit = served.model.config.vocab_size
    bad = next((i for i in ids if i < 0 or i >= limit), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the model's vocabulary (0..{limit - 1})", param=param)
    seq2seq = served.model.config.family == "encoder-decoder"
    if len(ids) > C:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens and the model's context is {C} tokens"
            f"; shorten the prompt, or send "
            f"truncate_prompt_tokens (-1 keeps the last tokens that fit)",
            param=param,
            code="context_length_exceeded",
        )
    room = C if seq2seq else C - len(ids) + 1
    n = room if requested is None and default is None else (default if requested is None else requested)
    return ids, min(n, room)


def used_settings(cfg: GenerationConfig) -> dict:
    """The sampling settings a generation really used (for the votes database)."""
    return {
        "temperature": cfg.temperature if cfg.do_sample else 0.0,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "repetition_penalty": cfg.repetition_penalty,
        "presence_penalty": cfg.presence_penalty,
        "frequency_penalty": cfg.frequency_penalty,
        "max_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
    }


def sampling_config(body, max_new: int, seed: int | None, vocab: int, defaults: dict | None = None) -> GenerationConfig:
    """The request's sampling settings; a field it leaves out takes the served name's --sampling default."""
    for key, value in (defaults or {}).items():
        if getattr(body, key, None) is None:
            body = body.model_copy(update={key: value})
    temperature = 1.0 if body.temperature is None else body.temperature
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(r"-?[0-9]+", key.strip()) or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1})", param="logit_bias")
        bias[int(key)] = value
    cfg = GenerationConfig(
        logit_bias=bias or None,
        stop_token_ids=[] if body.ignore_eos else None,
        max_new_tokens=max_new,
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop_strings=body.stops(),
        seed=seed,
        json_schema=body.response_format.schema() if body.response_format is not None else None,
    )
    try:
        cfg.check()
    except LlmkitError as e:
        raise APIError(400, f"{e.message} ({e.fix})", param="stop" if cfg.json_schema is not None and cfg.stop_strings else None) from None
    if cfg.json_schema is not None:
        try:
            if body.ignore_eos:
                raise LlmkitError("a JSON answer ends on an end-of-sequence token", "drop ignore_eos, or response_format")
            check_schema(cfg.json_schema)
        except LlmkitError as e:
            raise APIError(400, f"{e.message} ({e.fix})", param="response_format") from None
    return cfg


def constraints(served: Served, configs: list[GenerationConfig]) -> list | None:
    """Each request's grammar with its first mask computed, here in the request's own thread rather than on the
    engine's, where the tokenizer's table (up to a second, once per tokenizer) would stall every running stream."""
    if all(c.json_schema is None for c in configs):
        return None
    if served.model.config.family != "decoder":
        raise APIError(400, f"response_format needs a decoder; {served.name} is a {served.model.config.family}", param="response_format")
    n_valid = min(served.tok.id_limit, served.model.config.vocab_size)
    out: list = []
    for c in configs:
        grammar = constraint_for(c, served.tok, n_valid, stop_rules(served.tok, c, served.model, warn=lambda m: None)[0])
        if grammar is not None:
            grammar.allowed(n_valid)
        out.append(grammar)
    return out


class Job:
    """The engine requests of one API request (prompts × n choices) and the events they send back, on the event loop."""

    def __init__(
        self,
        served: Served,
        prompts: list[list[int]],
        configs: list[GenerationConfig],
        logprobs: int | None,
        timeout: float,
        grammars: list | None = None,
    ):
        self.served = served
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + timeout
        grammars = grammars or [None] * len(configs)
        self.reqs = [
            EngineRequest(p, c, self._emitter(i), logprobs=logprobs, deadline=deadline, constraint=g)
            for i, (p, c, g) in enumerate(zip(prompts, configs, grammars))
        ]
        self.count = len(self.reqs)  # the choices, those answered without the engine (max_tokens 0) included

    def _emitter(self, index: int):
        def emit(event):
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        return emit

    def submit(self) -> None:
        try:
            self.served.generator.submit(self.reqs)
        except TooMany as e:
            raise APIError(
                400,
                f"the request asks for {e.asked} sequences (prompts x n) and this server runs and queues at most "
                f"{e.limit}; lower n or send fewer prompts",
                param="n",
            ) from None
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy: {self.served.generator.running} requests run and the queue "
                f"({self.served.generator.max_queue}) is full; retry after {e.retry_after} s",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None

    def withdraw(self) -> None:
        for r in self.reqs:
            self.served.generator.withdraw(r)


def error_from_event(kind: str, message: str) -> APIError:
    status = {"timeout": 504, "shutdown": 503}.get(kind, 500)
    return APIError(status, message, "server_error" if status != 504 else "timeout", code=kind, counted=True)


async def collect(job: Job, request: Request) -> tuple[list[dict], APIError | None]:
    """Wait for every choice to finish (a client that leaves withdraws them); [{text, tokens, finish, usage}, ...]."""
    out: list[dict] = [{"text": [], "tokens": [], "finish": None, "usage": None} for _ in range(job.count)]
    left = job.count
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while left:
            get = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                job.withdraw()
                return out, APIError(499, "the client closed the connection", code="cancelled")
            i, event = get.result()
            if event[0] == "token":
                out[i]["text"].append(event[1])
                if event[2] is not None:
                    out[i]["tokens"].append((event[2], event[3]))
            elif event[0] == "done":
                out[i]["finish"], out[i]["usage"] = event[1], event[2]
                left -= 1
            else:
                job.withdraw()
                return out, error_from_event(event[1], event[2])
        return out, None
    finally:  # a cancelled task (the server's shutdown timeout) leaves nothing decoding
        gone.cancel()
        if left:
            job.withdraw()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by then: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens whose keys and values came from the prefix cache as it reports them."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def chat_logprobs(served: Served, tokens: list[tuple[int, tuple]]) -> dict:
    content = []
    for t, (lp, best) in tokens:
        item = token_info(served, t, lp)
        item["top_logprobs"] = [token_info(served, b, blp) for b, blp in best]
        content.append(item)
    return {"content": content}


def completion_logprobs(served: Served, tokens: list[tuple[int, tuple]], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, (lp, best) in tokens:
        text = served.tok.decode([t], strict=False)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        top: dict[str, float] = {}
        for b, blp in best:
            top.setdefault(served.tok.decode([b], strict=False), blp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def prompt_of_messages(served: Served, messages, tools: list[dict] | None = None) -> list[int]:
    """The conversation's ids under the model's chat template, with the tools it may call (and earlier calls and
    their results) written as the template, or else the Hermes form, writes them (`llmkit.chat.render_chat`)."""
    try:
        return chat_prompt_ids(served.tok, [m.for_template() for m in messages], tools=tools)
    except LlmkitError as e:
        raise APIError(400, f"{e.message} ({e.fix})", param="messages") from None


def log_request(state: State, route: str, served: Served, prompts: list[list[int]], text=None) -> None:
    """One line per request; the prompt itself only with --log-prompts (`text` is called only then)."""
    if state.settings.log_prompts and text is not None:
        log.info("%s model=%s prompt_tokens=%s prompt=%s", route, served.name, [len(p) for p in prompts], text())
    else:
        log.info("%s model=%s prompt_tokens=%s", route, served.name, [len(p) for p in prompts])


def assistant_message(text: str, finish: str | None, tools: list[str] | None) -> tuple[dict, str | None]:
    """(the chat answer's message, its finish reason): with tools offered, the calls read from the text go to
    `tool_calls` and an answer that called ends with "tool_calls", as OpenAI reports it."""
    if tools:
        content, calls = parse_tool_calls(text, tools)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls" if finish == "stop" else finish
    return {"role": "assistant", "content": text}, finish


async def run_job(
    state: State,
    request: Request,
    served: Served,
    prompts,
    configs,
    logprobs,
    *,
    chat: bool,
    body,
    record: dict | None = None,
    tools: list[str] | None = None,
):
    """Generate prompts[i] with configs[i] (each prompt repeated body.n times in a row: its n choices). `tools`: the
    names of the functions offered (chat), whose calls are read from the answers."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    echo = [served.tok.decode(p, skip_special_tokens=True) for p in prompts] if not chat and body.echo else None
    zero = [i for i, c in enumerate(configs) if c.max_new_tokens == 0]
    grammars = await asyncio.to_thread(constraints, served, configs) if any(c.json_schema is not None for c in configs) else None
    job = Job(served, prompts, configs, logprobs, state.settings.timeout, grammars)
    if zero:  # nothing to generate (max_tokens 0): answered here, never queued
        job.reqs = [r for i, r in enumerate(job.reqs) if i not in zero]
        for i in zero:
            job.events.put_nowait((i, ("done", "length", {"prompt_tokens": len(prompts[i]), "completion_tokens": 0})))
    if job.reqs:
        job.submit()
    if body.stream:
        return StreamingResponse(
            stream_job(state, job, served, rid, created, chat, body, prompts, echo, record, tools),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    out, error = await collect(job, request)
    if error is not None:
        raise error
    choices: list[dict] = []
    for i, o in enumerate(out):
        text = "".join(o["text"])
        if chat:
            message, finish = assistant_message(text, o["finish"], tools)
            choice = {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(served, o["tokens"]) if logprobs is not None else None,
                "finish_reason": finish,
            }
        else:
            full = (echo[i] + text) if echo else text
            choice = {
                "index": i,
                "text": full,
                "finish_reason": o["finish"],
                "logprobs": completion_logprobs(served, o["tokens"], len(echo[i]) if echo else 0) if logprobs is not None else None,
            }
        choices.append(choice)
    prompt_tokens = sum(len(p) for p in prompts[:: body.n])  # each prompt once, however many choices
    completion_tokens = sum(o["usage"]["completion_tokens"] for o in out)
    cached_tokens = sum(o["usage"].get("cached_tokens", 0) for o in out[:: body.n])  # each prompt once
    first: dict = choices[0]["message"] if chat else {}
    kept = first.get("content") or (json.dumps(first["tool_calls"], ensure_ascii=False) if first.get("tool_calls") else "")
    extra = {"answer_id": state.keep_answer(answer=kept, **record)} if record else {}
    return {
        **extra,
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": served.name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


async def stream_job(
    state: State,
    job: Job,
    served: Served,
    rid: str,
    created: int,
    chat: bool,
    body,
    prompts,
    echo,
    record: dict | None = None,
    tools: list[str] | None = None,
):
    """The answer as server-sent events. With tools offered, each choice's text goes through a `ToolCallStream`: a
    call is sent as one `tool_calls` delta (its id, name and whole arguments) once its block is complete, as OpenAI's
    clients accumulate them, and the choice ends with "tool_calls"."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    parsers = [ToolCallStream(tools) for _ in prompts] if chat and tools else None
    calls_sent = [0] * len(prompts)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    prompt_tokens = sum(len(p) for p in prompts[:: body.n])
    completion_tokens, cached_tokens, left = 0, 0, len(prompts)
    offsets = [len(e) for e in echo] if echo else [0] * len(prompts)

    answer: list[str] = []  # choice 0's text, when the answer is kept (record)

    def chunk(i: int, *, delta: dict | None = None, text: str | None = None, finish=None, logprobs=None, extra=None) -> str:
        choice = {"index": i, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        data = {"id": rid, "object": kind, "created": created, "model": served.name, "system_fingerprint": None, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse({**data, **(extra or {})})

    def call_chunks(i: int, calls: list[dict]) -> list[str]:
        """Each call read from choice i's text as one `tool_calls` delta (its index among the choice's calls)."""
        out = []
        for call in calls:
            answer.append(json.dumps(call, ensure_ascii=False))  # what a vote on this answer rates
            out.append(chunk(i, delta={"tool_calls": [{"index": calls_sent[i], **call}]}))
            calls_sent[i] += 1
        return out

    try:
        for i in range(len(prompts)):
            if chat:
                yield chunk(i, delta={"role": "assistant", "content": ""})
            elif echo:
                yield chunk(i, text=echo[i])
        while left:
            i, event = await job.events.get()
            if event[0] == "token":
                _, piece, token, lp = event
                if not piece and token is None:
                    continue
                logprobs = None
                if token is not None and lp is not None:
                    logprobs = chat_logprobs(served, [(token, lp)]) if chat else completion_logprobs(served, [(token, lp)], offsets[i])
                calls: list[dict] = []
                if parsers is not None:
                    piece, calls = parsers[i].push(piece)
                if piece or logprobs is not None:
                    offsets[i] += len(piece)
                    answer.append(piece)
                    yield chunk(i, delta={"content": piece}, text=piece, logprobs=logprobs)
                for c in call_chunks(i, calls):
                    yield c
            elif event[0] == "done":
                completion_tokens += event[2]["completion_tokens"]
                if i % body.n == 0:  # each prompt once, however many choices
                    cached_tokens += event[2].get("cached_tokens", 0)
                left -= 1
                finish = event[1]
                if parsers is not None:
                    rest, calls = parsers[i].end()
                    if rest:
                        answer.append(rest)
                        yield chunk(i, delta={"content": rest}, text=rest)
                    for c in call_chunks(i, calls):
                        yield c
                    if calls_sent[i] and finish == "stop":
                        finish = "tool_calls"
                extra = {"answer_id": state.keep_answer(answer="".join(answer), **record)} if record else None
                yield chunk(i, finish=finish, extra=extra)
            else:
                e = error_from_event(event[1], event[2])
                yield sse(error_body(e.message, e.type, code=e.code))
                job.withdraw()
                break
        else:
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": kind,
                        "created": created,
                        "model": served.name,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
                    }
                )
        yield sse("[DONE]")
    finally:  # the client left mid-stream (the task is cancelled) or the stream ended: free the slots
        job.withdraw()


async def chat_events(state: State, served: Served, messages: list[dict], fields: dict, request: Request):
    """One chat answer as events for the arena: ("queued", None) once submitted, then ("delta", text) and ("done",
    finish reason); APIError for what goes wrong."""
    fields = {**fields, **state.settings.sampling.get(served.name, {})}  # the served name's own settings win
    ids, max_new = fit(served, chat_prompt_ids(served.tok, messages), fields.get("max_tokens"), None, None, "prompt")
    sampling = ChatRequest.model_construct(model=served.name, messages=[], **fields)  # unvalidated: _config checks the values
    cfg = sampling_config(sampling, max_new, None, served.tok.id_limit)
    job = Job(served, [ids], [cfg], None, state.settings.timeout)
    job.submit()
    try:
        yield ("queued", used_settings(cfg))
        while True:
            _, event = await job.events.get()
            if event[0] == "token":
                if event[1]:
                    yield ("delta", event[1])
            elif event[0] == "done":
                yield ("done", event[1])
                return
            else:
                raise error_from_event(event[1], event[2])
    finally:
        job.withdraw()
