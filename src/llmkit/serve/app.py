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

import logging
import threading
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit import __version__
from llmkit.errors import LlmkitError
from llmkit.serve.guard import Guard
from llmkit.serve.protocol import describe_validation, error_body
from llmkit.serve.routes import arena, embeddings, generation, page, tokens
from llmkit.serve.routes import models as model_routes
from llmkit.serve.state import APIError, BodyTooLarge, Settings, State

__all__ = ["APIError", "Settings", "State", "create_app"]

log = logging.getLogger("llmkit.serve")


def create_app(
    models: list[tuple[str, object]],
    embedding_models: Sequence[tuple[str, object]] = (),
    settings: Settings | None = None,
    *,
    load_in_background: bool = True,
) -> FastAPI:
    """The API over `models` [(name, spec or loaded model)] and `embedding_models`. With `load_in_background`, the
    server answers at once (/health is 503 until the models are loaded)."""
    state = State(list(models), list(embedding_models), settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, name="llmkit-load", daemon=True).start()
        else:
            state.load()
        yield
        state.close()

    app = FastAPI(title="llmkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmkit = state
    add_error_handlers(app, state)
    for group in (model_routes, generation, embeddings, tokens, page, arena):
        app.include_router(group.router)
    app.mount("/ui", StaticFiles(directory=page.WEB), name="ui")
    app.add_middleware(Guard, state=state)
    if state.settings.cors_origins:  # outside the guard: its 401 and 413 answers carry the CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )  # the openai JS client sends x-stainless-* headers
    return app


def add_error_handlers(app: FastAPI, state: State) -> None:
    """Every error in OpenAI's shape, counted in the metrics by kind."""
    settings = state.settings

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
