"""The OpenAI-compatible HTTP API (FastAPI), over one engine per generating model and a worker per embedding model.

    GET  /health                 public; 503 while the models load
    GET  /v1/models              the served models (and /v1/models/{id})
    POST /v1/chat/completions    messages through the model's chat template; stream: server-sent events
    POST /v1/completions         prompt(s) as text or token ids; stream: server-sent events
    POST /v1/embeddings          float or base64
    POST /tokenize, /detokenize  text <-> token ids (vLLM's shape)
    GET  /metrics                Prometheus text

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad JSON or values (an unknown
field is named), 401 a missing or wrong key, 404 an unknown model or route, 413 a body over the limit, 429 (with
Retry-After) a full queue, 503 while loading or shutting down, 504 a request over --timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig
from llmkit.model import weights as model_weights
from llmkit.serve.engine import Engine, QueueFull, ShuttingDown, TooMany
from llmkit.serve.engine import Request as EngineRequest
from llmkit.serve.metrics import Metrics
from llmkit.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    describe_validation,
    error_body,
)
from llmkit.threads import release_openmp_threads
from llmkit.tokenizer.pretrained import bytes_to_unicode

log = logging.getLogger("llmkit.serve")

ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/",
    "/applications",
    "/arena/battles",
    "/arena/votes",
    "/arena/leaderboard",
    "/ratings",
)
PUBLIC = ("/health", "/", "/favicon.ico")  # and the page's files under /ui/: no data, so the page can load and ask for the key
WEB = Path(__file__).parent / "web"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
        counted: bool = False,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers
        self.counted = counted  # already in the error metrics (the engine counts what it reports)


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read (FastAPI passes HTTP exceptions through its body parsing; others become 400)."""

    def __init__(self):
        super().__init__(413, "body too large")


@dataclass
class Settings:
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    timeout: float = 600.0  # seconds a request may take, queue included
    max_body: int = 4 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    dtype: str | None = None
    quantize: str | None = None  # auto | none | int8 | int4 (None: as loaded)
    compile: bool = False  # the compiled decode step on a CPU (`llmkit serve` turns it on; --no-compile)
    db: str | None = None  # the SQLite file of votes, ratings and the answers they rate (the CLI's default: runs/votes.db)
    sampling: dict[str, dict] = field(default_factory=dict)  # served name -> default sampling fields (temperature, top_p, ...)


class Served:
    """One model under its name: a generating one (its engine) or an embedding one (its worker)."""

    def __init__(self, name: str, model, settings: Settings, metrics: Metrics, embedding: bool):
        self.name, self.model, self.tok = name, model, model.tokenizer
        self.created = int(time.time())
        if self.tok is None:
            raise LlmkitError(f"the model {name!r} has no tokenizer", "serve a model folder that holds tokenizer.json")
        family = model.config.family
        self.embedding = embedding or family == "encoder"
        self.context = model.config.max_seq_len
        self.engine = (
            None if self.embedding else Engine(model, name, max_batch=settings.max_batch, max_queue=settings.max_queue, metrics=metrics)
        )
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"llmkit-embed-{name}") if self.embedding else None
        self.pending = 0  # embedding requests taken and not answered
        self.byte_level = _decoder_type(self.tok) == "ByteLevel"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _embed(model, encoded):
    """Embed on the pool's thread, then let that thread's OpenMP workers go: alive, they slow the engines' threads."""
    from llmkit.embed.contextual import embed_ids

    try:
        return embed_ids(model, encoded)
    finally:
        release_openmp_threads()


def _decoder_type(tok) -> str | None:
    try:
        return (json.loads(tok.backend.to_str()).get("decoder") or {}).get("type")
    except (ValueError, AttributeError):
        return None


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


class State:
    """What the app holds: the settings, the models (once loaded), the metrics."""

    def __init__(self, specs: list[tuple[str, object]], embedding_specs: list[tuple[str, object]], settings: Settings):
        self.specs, self.embedding_specs, self.settings = specs, embedding_specs, settings
        self.metrics = Metrics()
        self.models: dict[str, Served] = {}
        self.votes = None
        self.answers: collections.OrderedDict[str, dict] = collections.OrderedDict()  # answer id -> what keep_answer kept
        if settings.db:
            from llmkit.serve.votes import VoteStore

            self.votes = VoteStore(settings.db)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.closing = False
        self.on_load_error = None  # called with the message when a model fails to load (the CLI stops the server)

    def load(self) -> None:
        import torch

        from llmkit.model.compiled import prepare_for_decoding

        loaded: dict[str, object] = {}  # one spec served under two names (e.g. two sampling settings) is loaded once
        try:
            for specs, embedding in ((self.specs, False), (self.embedding_specs, True)):
                for name, spec in specs:
                    if name in self.models:
                        raise LlmkitError(f"two models are served as {name!r}", "give each --model its own name: --model NAME=PATH")
                    if isinstance(spec, str) and spec in loaded:
                        model = loaded[spec]
                    elif isinstance(spec, str):
                        log.info("loading %s from %s", name, spec)
                        q = self.settings.quantize
                        model = loaded[spec] = model_weights.load(
                            spec,
                            dtype=torch.bfloat16 if self.settings.dtype == "bf16" else None,
                            quantize=q if embedding and q not in (None, "auto", "none") else None,
                        )
                        if not embedding:  # a GGUF's own blocks (auto) and the compiled decode step on a CPU, built behind
                            prepare_for_decoding(model, q, self.settings.compile)
                    else:
                        model = spec
                    self.models[name] = Served(name, model, self.settings, self.metrics, embedding)
            for served in self.models.values():  # ready once every engine's worker runs (its compiled steps build behind it)
                while served.engine is not None and not served.engine.warm.wait(0.5):
                    if self.closing or not served.engine.thread.is_alive():
                        break
            if self.closing:
                return
            self.ready.set()
            log.info("ready: %s", ", ".join(self.models))
        except Exception as e:  # noqa: BLE001  (reported on /health and to the CLI)
            self.load_error = e.message if isinstance(e, LlmkitError) else f"{type(e).__name__}: {e}"
            if isinstance(e, LlmkitError):
                self.load_error += f" — {e.fix}"
            log.error("a model failed to load: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
        finally:
            release_openmp_threads()  # the load's idle OpenMP team (the embedding model's, say) would slow the engines

    def keep_answer(self, **record) -> str:
        """An id for an answer the page may rate: the answer stays in memory (the last 2,000) and reaches the database
        only with a rating (unrated chats are never stored)."""
        answer_id = self.votes.sign(f"ans-{secrets.token_urlsafe(12)}")
        self.answers[answer_id] = record
        while len(self.answers) > 2000:
            self.answers.popitem(last=False)
        return answer_id

    def close(self) -> None:
        self.closing = True
        for served in self.models.values():
            served.close()
        if self.votes is not None:
            self.votes.close()

    def check_ready(self) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if not self.ready.is_set():
            raise APIError(
                503,
                self.load_error or "the models are still loading; retry in a few seconds",
                "server_error",
                code="loading",
                headers={"Retry-After": "5"},
            )

    def get(self, name: str, *, embedding: bool | None) -> Served:
        """The served model `name`: an embedding one (embedding=True), a generating one (False) or either (None)."""
        self.check_ready()
        served = self.models.get(name)
        if served is None:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has: {', '.join(self.models)}",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if embedding is True and not served.embedding:
            raise APIError(
                400,
                f"the model {name!r} generates text; embed with an embedding model: "
                f"{', '.join(n for n, s in self.models.items() if s.embedding) or 'none is served (--embedding-model)'}",
                param="model",
            )
        if embedding is False and served.embedding:
            raise APIError(
                400,
                f"the model {name!r} is an embedding model; use /v1/embeddings, or a generating model: "
                f"{', '.join(n for n, s in self.models.items() if not s.embedding) or 'none is served'}",
                param="model",
            )
        return served


# --- the guard: API key, body size, metrics per route (plain ASGI: streaming and disconnects pass untouched) -------


class Guard:
    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, metrics = self.state.settings, self.state.metrics
        route = (
            scope["path"]
            if scope["path"] in ROUTES
            else ("/v1/models" if scope["path"].startswith("/v1/models/") else "/ui" if scope["path"].startswith("/ui/") else "other")
        )
        started, status = time.monotonic(), [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            public = scope["path"] in PUBLIC or scope["path"].startswith("/ui/")
            if settings.api_key and not public:
                given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
                token = given[7:] if given[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, settings.api_key.encode()):
                    metrics.errors.labels("auth").inc()
                    message = "a wrong API key was given" if token else "an API key is required: send the header Authorization: Bearer KEY"
                    return await _send_json(send_counted, 401, error_body(message, "authentication_error", code="invalid_api_key"))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body:
                metrics.errors.labels("too_large").inc()
                return await _send_json(
                    send_counted,
                    413,
                    error_body(
                        f"the body is {int(length)} bytes, more than the limit of {settings.max_body}",
                        "invalid_request_error",
                        code="body_too_large",
                    ),
                )
            seen = [0]

            async def receive_counted():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > settings.max_body:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_counted, send_counted)
        finally:
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


# --- requests to the engine ------------------------------------------------------------------------------------------


def _fit(
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


def _config(body, max_new: int, seed: int | None, vocab: int, defaults: dict | None = None) -> GenerationConfig:
    """The request's sampling settings; a field it leaves out takes the served name's --sampling default."""
    for key, value in (defaults or {}).items():
        if getattr(body, key, None) is None:
            body = body.model_copy(update={key: value})
    temperature = 1.0 if body.temperature is None else body.temperature
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.strip().lstrip("-").isdigit() or not 0 <= int(key) < vocab:
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
    )
    try:
        cfg.check()
    except LlmkitError as e:
        raise APIError(400, f"{e.message} ({e.fix})") from None
    return cfg


class Job:
    """The engine requests of one API request (prompts × n choices) and the events they send back, on the event loop."""

    def __init__(self, served: Served, prompts: list[list[int]], configs: list[GenerationConfig], logprobs: int | None, timeout: float):
        self.served = served
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + timeout
        self.reqs = [
            EngineRequest(p, c, self._emitter(i), logprobs=logprobs, deadline=deadline) for i, (p, c) in enumerate(zip(prompts, configs))
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
            self.served.engine.submit(self.reqs)
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
                f"the server is busy: {self.served.engine.running} requests run and the queue "
                f"({self.served.engine.max_queue}) is full; retry after {e.retry_after} s",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None

    def withdraw(self) -> None:
        for r in self.reqs:
            self.served.engine.withdraw(r)


def _error_from_event(kind: str, message: str) -> APIError:
    status = {"timeout": 504, "shutdown": 503}.get(kind, 500)
    return APIError(status, message, "server_error" if status != 504 else "timeout", code=kind, counted=True)


async def _collect(job: Job, request: Request) -> tuple[list[dict], APIError | None]:
    """Wait for every choice to finish (a client that leaves withdraws them); [{text, tokens, finish, usage}, ...]."""
    out = [{"text": [], "tokens": [], "finish": None, "usage": None} for _ in range(job.count)]
    left = job.count
    gone = asyncio.ensure_future(_disconnected(request))
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
                return out, _error_from_event(event[1], event[2])
        return out, None
    finally:  # a cancelled task (the server's shutdown timeout) leaves nothing decoding
        gone.cancel()
        if left:
            job.withdraw()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by then: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _chat_logprobs(served: Served, tokens: list[tuple[int, tuple]]) -> dict:
    content = []
    for t, (lp, best) in tokens:
        item = token_info(served, t, lp)
        item["top_logprobs"] = [token_info(served, b, blp) for b, blp in best]
        content.append(item)
    return {"content": content}


def _completion_logprobs(served: Served, tokens: list[tuple[int, tuple]], offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
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


# --- the app ---------------------------------------------------------------------------------------------------------------


def create_app(
    models: list[tuple[str, object]],
    embedding_models: list[tuple[str, object]] = (),
    settings: Settings | None = None,
    *,
    load_in_background: bool = True,
) -> FastAPI:
    """The API over `models` [(name, spec or loaded model)] and `embedding_models`. With `load_in_background`, the
    server answers at once (/health is 503 until the models are loaded)."""
    settings = settings or Settings()
    state = State(list(models), list(embedding_models), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, name="llmkit-load", daemon=True).start()
        else:
            state.load()
        yield
        state.close()

    app = FastAPI(title="llmkit", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmkit = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if not e.counted:
            kind = {400: "bad_request", 404: "not_found", 429: "queue_full", 499: "cancelled", 503: "unavailable"}.get(
                e.status, "server_error"
            )
            state.metrics.errors.labels(kind).inc()
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        message, param = describe_validation(e.errors())
        state.metrics.errors.labels("bad_request").inc()
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge):
        state.metrics.errors.labels("too_large").inc()
        return JSONResponse(
            error_body(f"the body is more than the limit of {settings.max_body} bytes", "invalid_request_error", code="body_too_large"),
            status_code=413,
        )

    @app.exception_handler(LlmkitError)
    async def llmkit_error(request: Request, e: LlmkitError):
        state.metrics.errors.labels("bad_request").inc()
        return JSONResponse(error_body(f"{e.message} ({e.fix})", "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if isinstance(e, BodyTooLarge):
            return await too_large(request, e)
        state.metrics.errors.labels("not_found" if e.status_code == 404 else "bad_request").inc()
        message = f"there is no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, "invalid_request_error", code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        state.metrics.errors.labels("server_error").inc()
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if state.ready.is_set() and not state.closing:
            return {"status": "ok", "models": list(state.models)}
        status = "shutting down" if state.closing else ("failed" if state.load_error else "loading")
        return JSONResponse({"status": status, **({"error": state.load_error} if state.load_error else {})}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(served: Served) -> dict:
        return {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "llmkit",
            "max_model_len": served.context,
            "kind": "embedding" if served.embedding else "generation",
        }

    @app.get("/v1/models")
    async def list_models():
        state.check_ready()
        return {"object": "list", "data": [model_card(s) for s in state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return model_card(state.get(name, embedding=None))

    def prompt_of_messages(served: Served, messages) -> list[int]:
        from llmkit.chat import chat_prompt_ids

        return chat_prompt_ids(served.tok, [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in messages])

    def log_request(route: str, served: Served, prompts: list[list[int]], text=None) -> None:
        """One line per request; the prompt itself only with --log-prompts (`text` is called only then)."""
        if settings.log_prompts and text is not None:
            log.info("%s model=%s prompt_tokens=%s prompt=%s", route, served.name, [len(p) for p in prompts], text())
        else:
            log.info("%s model=%s prompt_tokens=%s", route, served.name, [len(p) for p in prompts])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        served = state.get(body.model, embedding=False)
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_completion_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ids, max_new = _fit(
            served,
            prompt_of_messages(served, body.messages),
            body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            None,
            body.truncate_prompt_tokens,
            "messages",
        )
        log_request("chat", served, [ids], lambda: json.dumps([m.model_dump() for m in body.messages], ensure_ascii=False))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        configs = [
            _config(body, max_new, None if body.seed is None else body.seed + i, served.tok.id_limit, settings.sampling.get(served.name))
            for i in range(body.n)
        ]
        record = None  # the page's answers (it sends its session) get an id, so that they can be rated
        if state.votes is not None and body.n == 1 and "x-llmkit-session" in request.headers:
            system = "\n".join(m.text() for m in body.messages if m.role in ("system", "developer")) or None
            record = {
                "model": served.name,
                "prompt": json.dumps([m.model_dump(exclude_none=True) for m in body.messages], ensure_ascii=False),
                "system": system,
                "settings": used_settings(configs[0]),
            }
        return await run_job(request, served, [ids] * body.n, configs, logprobs, chat=True, body=body, record=record)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = state.get(body.model, embedding=False)
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [served.tok.encode(raw)]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [list(raw)]
        elif raw and all(isinstance(x, str) for x in raw):
            prompts = [served.tok.encode(p) for p in raw]
        elif raw:
            prompts = [list(p) for p in raw]
        else:
            raise APIError(400, "the prompt is empty", param="prompt")
        if body.echo and body.logprobs is not None:
            raise APIError(
                400, "echo with logprobs (log-probabilities of the prompt) is not supported; use llmkit eval for scoring", param="echo"
            )
        fitted = [_fit(served, p, body.max_tokens, 16, body.truncate_prompt_tokens, "prompt") for p in prompts]
        log_request("completions", served, [p for p, _ in fitted], lambda: json.dumps(raw, ensure_ascii=False))
        all_prompts, configs = [], []
        for p, max_new in fitted:
            for i in range(body.n):
                all_prompts.append(p)
                configs.append(
                    _config(
                        body, max_new, None if body.seed is None else body.seed + i, served.tok.id_limit, settings.sampling.get(served.name)
                    )
                )
        return await run_job(request, served, all_prompts, configs, body.logprobs, chat=False, body=body)

    async def run_job(request: Request, served: Served, prompts, configs, logprobs, *, chat: bool, body, record: dict | None = None):
        """Generate prompts[i] with configs[i] (each prompt repeated body.n times in a row: its n choices)."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        echo = [served.tok.decode(p, skip_special_tokens=True) for p in prompts] if not chat and body.echo else None
        zero = [i for i, c in enumerate(configs) if c.max_new_tokens == 0]
        job = Job(served, prompts, configs, logprobs, settings.timeout)
        if zero:  # nothing to generate (max_tokens 0): answered here, never queued
            job.reqs = [r for i, r in enumerate(job.reqs) if i not in zero]
            for i in zero:
                job.events.put_nowait((i, ("done", "length", {"prompt_tokens": len(prompts[i]), "completion_tokens": 0})))
        if job.reqs:
            job.submit()
        if body.stream:
            return StreamingResponse(
                stream_job(job, served, rid, created, chat, body, prompts, echo, record),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        out, error = await _collect(job, request)
        if error is not None:
            raise error
        choices = []
        for i, o in enumerate(out):
            text = "".join(o["text"])
            if chat:
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": _chat_logprobs(served, o["tokens"]) if logprobs is not None else None,
                    "finish_reason": o["finish"],
                }
            else:
                full = (echo[i] + text) if echo else text
                choice = {
                    "index": i,
                    "text": full,
                    "finish_reason": o["finish"],
                    "logprobs": _completion_logprobs(served, o["tokens"], len(echo[i]) if echo else 0) if logprobs is not None else None,
                }
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in prompts[:: body.n])  # each prompt once, however many choices
        completion_tokens = sum(o["usage"]["completion_tokens"] for o in out)
        extra = {"answer_id": state.keep_answer(answer=choices[0]["message"]["content"], **record)} if record else {}
        return {
            **extra,
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": served.name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    async def stream_job(job: Job, served: Served, rid: str, created: int, chat: bool, body, prompts, echo, record: dict | None = None):
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prompt_tokens = sum(len(p) for p in prompts[:: body.n])
        completion_tokens, left = 0, len(prompts)
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
            return _sse({**data, **(extra or {})})

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
                        logprobs = (
                            _chat_logprobs(served, [(token, lp)]) if chat else _completion_logprobs(served, [(token, lp)], offsets[i])
                        )
                    if not piece and logprobs is None:
                        continue
                    offsets[i] += len(piece)
                    answer.append(piece)
                    yield chunk(i, delta={"content": piece}, text=piece, logprobs=logprobs)
                elif event[0] == "done":
                    completion_tokens += event[2]["completion_tokens"]
                    left -= 1
                    extra = {"answer_id": state.keep_answer(answer="".join(answer), **record)} if record else None
                    yield chunk(i, finish=event[1], extra=extra)
                else:
                    e = _error_from_event(event[1], event[2])
                    yield _sse(error_body(e.message, e.type, code=e.code))
                    job.withdraw()
                    break
            else:
                if include_usage:
                    yield _sse(
                        {
                            "id": rid,
                            "object": kind,
                            "created": created,
                            "model": served.name,
                            "system_fingerprint": None,
                            "choices": [],
                            "usage": _usage(prompt_tokens, completion_tokens),
                        }
                    )
            yield _sse("[DONE]")
        finally:  # the client left mid-stream (the task is cancelled) or the stream ended: free the slots
            job.withdraw()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        from llmkit.embed.contextual import input_limit

        served = state.get(body.model, embedding=True)
        raw = body.input
        if isinstance(raw, str):
            texts = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            texts = [list(raw)]
        else:
            texts = list(raw)
        if not texts:
            raise APIError(400, "the input is empty: give a text, a list of texts or token ids", param="input")
        limit = input_limit(served.model)
        encoded = []
        for i, t in enumerate(texts):
            ids = served.tok.encode(t) if isinstance(t, str) else list(t)
            if not ids or (isinstance(t, str) and not t):
                raise APIError(400, f"input {i} is empty", param="input")
            if len(ids) > limit:
                raise APIError(
                    400,
                    f"input {i} is {len(ids)} tokens, more than the model's limit of {limit}; shorten it or split it",
                    param="input",
                    code="context_length_exceeded",
                )
            bad = next((x for x in ids if x < 0 or x >= served.model.config.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"input {i}: token id {bad} is outside the model's vocabulary", param="input")
            encoded.append(ids)
        D = served.model.config.d_model
        if body.dimensions is not None and body.dimensions != D:
            raise APIError(
                400,
                f"the model {served.name!r} makes {D}-dimensional vectors; dimensions {body.dimensions} is not supported",
                param="dimensions",
            )
        if served.pending >= settings.max_queue + 1:  # one running, max_queue waiting
            state.metrics.errors.labels("queue_full").inc()
            raise APIError(
                429, "the embedding queue is full; retry in a second", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
            )
        served.pending += 1
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(served.pool, lambda: _embed(served.model, encoded))
        finally:
            served.pending -= 1
        data = []
        for i, v in enumerate(vectors.astype(np.float32)):
            value = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(map(len, encoded))
        return {"object": "list", "data": data, "model": served.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        served = state.get(body.model, embedding=None)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        ids = (
            served.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            if body.prompt is not None
            else prompt_of_messages(served, body.messages)
        )
        return {"count": len(ids), "max_model_len": served.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        served = state.get(body.model, embedding=None)
        limit = served.tok.id_limit
        bad = next((i for i in body.tokens if i < 0 or i >= limit), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary (0..{limit - 1})", param="tokens")
        return {"prompt": served.tok.decode(body.tokens)}

    @app.get("/", include_in_schema=False)
    async def page():
        # the page loads only its own files and talks only to this server, whatever a model writes
        return FileResponse(
            WEB / "index.html",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                "frame-ancestors 'none'",
            },
        )

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/ui", StaticFiles(directory=WEB), name="ui")

    async def chat_events(served: Served, messages: list[dict], fields: dict, request: Request):
        """One chat answer as events for the arena: ("queued", None) once submitted, then ("delta", text) and ("done",
        finish reason); APIError for what goes wrong."""
        from llmkit.chat import chat_prompt_ids

        fields = {**fields, **settings.sampling.get(served.name, {})}  # the served name's own settings win
        ids, max_new = _fit(served, chat_prompt_ids(served.tok, messages), fields.get("max_tokens"), None, None, "prompt")
        sampling = ChatRequest.model_construct(model=served.name, messages=[], **fields)  # unvalidated: _config checks the values
        cfg = _config(sampling, max_new, None, served.tok.id_limit)
        job = Job(served, [ids], [cfg], None, settings.timeout)
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
                    raise _error_from_event(event[1], event[2])
        finally:
            job.withdraw()

    from llmkit.serve.arena import add_routes

    add_routes(app, state, settings, chat_events)
    app.add_middleware(Guard, state=state)
    if settings.cors_origins:  # outside the guard: its 401 and 413 answers carry the CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )  # the openai JS client sends x-stainless-* headers
    return app


def _version() -> str:
    from llmkit import __version__

    return __version__
