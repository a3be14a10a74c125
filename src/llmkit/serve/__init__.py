"""Serving: the OpenAI-compatible HTTP API over llmkit's models.

    engine.py     one worker per model: continuous batching on a shared KV-cache timeline, per-request sampling and stops
    app.py        create_app: the state, the routers, the error handlers (OpenAI's shape), the guard, CORS
    state.py      what the app holds (settings, served models, metrics, votes) and APIError
    guard.py      API keys, body limits, metrics per route (plain ASGI)
    jobs.py       a request's way through the engine: prompt fitting, sampling settings, whole or streamed answers
    routes/       one APIRouter per group: models, generation, embeddings, tokens, arena (the votes API), page
    protocol.py   the request bodies (unknown fields are refused by name)
    metrics.py    Prometheus metrics; votes.py: the votes' SQLite store
    web/          the page (plain HTML, CSS, JavaScript); browser.py drives it in headless Chromium

`llmkit serve` (cli/serve.py) runs it on uvicorn; `create_app` gives the app to embed or test.
"""

from llmkit.serve.app import Settings, create_app
from llmkit.serve.engine import Engine, Request

__all__ = ["Engine", "Request", "Settings", "create_app"]
