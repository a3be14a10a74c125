"""The guard before every route: the Host header (against DNS rebinding), the API key, the body's size, and the
metrics per route (plain ASGI, so streaming and disconnects pass untouched; a response the client left before its end
is counted as 499, cancelled)."""

from __future__ import annotations

import hmac
import json
import time

from llmkit.serve.protocol import error_body
from llmkit.serve.state import BodyTooLarge, State

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
    "/arena/train",
    "/ratings",
)
PUBLIC = ("/health", "/", "/favicon.ico")  # and the page's files under /ui/: no data, so the page can load and ask for the key


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
        started, status, ended = time.monotonic(), [500], [False]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended[0] = True
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            host = _host_name(headers.get("host", ""))
            if settings.allowed_hosts is not None and host not in settings.allowed_hosts:
                metrics.errors.labels("bad_request").inc()
                message = (
                    f"this server does not answer to the host {host!r} (allowed: {', '.join(settings.allowed_hosts)}); "
                    "start it with --allowed-host NAME to add one"
                )
                return await _send_json(send_counted, 400, error_body(message, "invalid_request_error", code="host_not_allowed"))
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
                if message["type"] == "http.disconnect" and status[0] < 400 and not ended[0]:
                    status[0] = 499  # the client left before the response ended (a stream it abandoned)
                elif message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > settings.max_body:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_counted, send_counted)
        finally:
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)


def _host_name(host: str) -> str:
    """The Host header's name without its port, lower case ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
