"""Serving: the OpenAI-compatible HTTP API over llmkit's models.

    engine.py     one worker per model: continuous batching on a shared KV-cache timeline, per-request sampling and stops
    app.py        the FastAPI routes, errors in OpenAI's shape, API keys, body limits, streaming (server-sent events)
    protocol.py   the request bodies (unknown fields are refused by name)
    metrics.py    Prometheus metrics
    arena.py      the votes API behind the web page (battles, votes, ratings, leaderboard); votes.py: its SQLite store
    web/          the page (plain HTML, CSS, JavaScript); browser.py drives it in headless Chromium

`llmkit serve` (cli/serve.py) runs it on uvicorn; `create_app` gives the app to embed or test.
"""

from llmkit.serve.app import Settings, create_app
from llmkit.serve.engine import Engine, Request

__all__ = ["Engine", "Request", "Settings", "create_app"]
