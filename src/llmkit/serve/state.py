"""What a running server holds: its settings, the served models (an engine per generating model, a worker per
embedding model), the metrics, the votes database; and the API's error (`APIError`, OpenAI's shape)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.embed.contextual import embed_ids, input_limit
from llmkit.errors import LlmkitError
from llmkit.model import weights as model_weights
from llmkit.model.compiled import prepare_for_decoding
from llmkit.serve.engine import Engine
from llmkit.serve.metrics import Metrics
from llmkit.serve.votes import VoteStore
from llmkit.threads import release_openmp_threads

log = logging.getLogger("llmkit.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
VOTES_PER_MINUTE = 30  # votes and ratings, per client (address and session)
BATTLES_PER_MINUTE = 20


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
    prefill_chunk: int | None = 256  # prompt tokens prefilled between two decode steps (None: a whole prompt at once)
    prefix_cache_mb: float = 256.0  # earlier prompts' and answers' keys and values kept per model (0: none)
    default_max_tokens: int = 1024  # a chat answer's length when the request names none (/v1/models says so)
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    dtype: str | None = None  # auto | fp32 | bf16 | fp16 (None: as loaded)
    device: str | None = None  # where the models run ("auto", "cuda:1", ...; None: the CPU)
    quantize: str | None = None  # auto | none | int8 | int4 (None: as loaded)
    compile: bool = False  # the compiled decode step on a CPU (`llmkit serve` turns it on; --no-compile)
    db: str | None = None  # the SQLite file of votes, ratings and the answers they rate (the CLI's default: runs/votes.db)
    sampling: dict[str, dict] = field(default_factory=dict)  # served name -> default sampling fields (temperature, top_p, ...)
    # the Host names requests may carry (against DNS rebinding: a page of another origin reaching a local server); the
    # loopback names by default, as the server binds 127.0.0.1; None: any (`llmkit serve` on another address)
    allowed_hosts: list[str] | None = field(default_factory=lambda: list(LOOPBACK_HOSTS))


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
        # what a request may hold: the context, or for an embedding model the tokens it embeds (MiniLM: 256, not 512)
        self.input_limit = input_limit(model) if self.embedding else self.context
        self.engine = (
            None
            if self.embedding
            else Engine(
                model,
                name,
                max_batch=settings.max_batch,
                max_queue=settings.max_queue,
                prefill_chunk=settings.prefill_chunk,
                prefix_cache_mb=settings.prefix_cache_mb,
                metrics=metrics,
            )
        )
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"llmkit-embed-{name}") if self.embedding else None
        self.pending = 0  # embedding requests taken and not answered
        self.byte_level = _decoder_type(self.tok) == "ByteLevel"

    @property
    def generator(self) -> Engine:
        """The engine of a generating model (an embedding model has none)."""
        if self.engine is None:
            raise APIError(400, f"the model {self.name!r} is an embedding model; it does not generate", param="model")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def embed_on_worker(model, encoded):
    """Embed on the pool's thread, then let that thread's OpenMP workers go: alive, they slow the engines' threads."""
    try:
        return embed_ids(model, encoded)
    finally:
        release_openmp_threads()


def _decoder_type(tok) -> str | None:
    try:
        return (json.loads(tok.backend.to_str()).get("decoder") or {}).get("type")
    except (ValueError, AttributeError):
        return None


class Limiter:
    """At most `per_minute` events per client in any 60 s (idle clients are forgotten)."""

    def __init__(self, per_minute: int = VOTES_PER_MINUTE, what: str = "votes"):
        self.per_minute, self.what = per_minute, what
        self.times: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def check(self, client: str) -> None:
        now = time.monotonic()
        if len(self.times) > 10_000:  # forget the clients idle for a minute
            for key in [k for k, t in self.times.items() if not t or t[-1] < now - 60]:
                del self.times[key]
        times = self.times[client]
        while times and times[0] < now - 60:
            times.popleft()
        if len(times) >= self.per_minute:
            wait = max(1, int(times[0] + 60 - now) + 1)
            raise APIError(
                429,
                f"too many {self.what} from this client: at most {self.per_minute} a minute",
                "rate_limit_error",
                code="vote_rate_limit" if self.what == "votes" else "battle_rate_limit",
                headers={"Retry-After": str(wait)},
            )
        times.append(now)


class Arena:
    """The arena's state in one app: the per-client limits and the last leaderboard (refit only when votes came)."""

    def __init__(self):
        self.votes, self.battles = Limiter(), Limiter(BATTLES_PER_MINUTE, what="battles")
        self.board: dict = {}
        self.board_lock = asyncio.Lock()
        self.training = None  # the DPO run from the votes (llmkit.serve.training), the last one started


class State:
    """What the app holds: the settings, the models (once loaded), the metrics."""

    def __init__(self, specs: list[tuple[str, object]], embedding_specs: list[tuple[str, object]], settings: Settings):
        self.specs, self.embedding_specs, self.settings = specs, embedding_specs, settings
        self.metrics = Metrics()
        self.models: dict[str, Served] = {}
        self.votes = None
        self.answers: collections.OrderedDict[str, dict] = collections.OrderedDict()  # answer id -> what keep_answer kept
        if settings.db:
            self.votes = VoteStore(settings.db)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.closing = False
        self.on_load_error = None  # called with the message when a model fails to load (the CLI stops the server)
        self.arena = Arena()  # the arena routes' limits and leaderboard
        self.adding = threading.Lock()  # a model added while serving (llmkit.serve.training) against close()

    def load(self) -> None:
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
                            dtype=self.settings.dtype,
                            device=self.settings.device,
                            quantize=q if embedding and q not in (None, "auto", "none", "gguf") else None,  # GGUF blocks: decoders only
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
        if self.votes is None:
            raise RuntimeError("answers are kept only with a votes database")
        answer_id = self.votes.sign(f"ans-{secrets.token_urlsafe(12)}")
        self.answers[answer_id] = record
        while len(self.answers) > 2000:
            self.answers.popitem(last=False)
        return answer_id

    def end_requests(self) -> None:
        """End every running and waiting generation with a "shutdown" error (the server stops; its grace is over)."""
        for served in self.models.values():
            if served.engine is not None:
                served.engine.close(wait=0)

    def close(self) -> None:
        with self.adding:
            self.closing = True
        if self.arena.training is not None:
            self.arena.training.cancel()
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


def get_state(request: Request) -> State:
    """The app's State (a dependency of every route)."""
    return request.app.state.llmkit


AppState = Annotated[State, Depends(get_state)]  # a route's parameter `state: AppState` receives the app's State
