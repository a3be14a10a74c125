"""The server's Prometheus metrics (GET /metrics), in a registry of their own (two servers in one process, e.g. in
tests, never collide)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmkit_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.errors = Counter("llmkit_errors", "errors, by kind", ["kind"], registry=r)
        self.queue_length = Gauge("llmkit_queue_length", "requests waiting for a running slot", ["model"], registry=r)
        self.running = Gauge("llmkit_running_batch_size", "sequences decoded together now", ["model"], registry=r)
        self.tokens = Counter("llmkit_generated_tokens", "tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "prompt tokens prefilled", ["model"], registry=r)
        self.compiled_steps = Gauge(
            "llmkit_compiled_decode_steps",
            "compiled decode steps (one per padded batch size): in use, or still building while the engine decodes eagerly",
            ["model", "state"],
            registry=r,
        )
        self.tokens_per_second = Gauge("llmkit_tokens_per_second", "tokens generated per second over the last 10 s", ["model"], registry=r)
        self.ttft = Histogram(
            "llmkit_time_to_first_token_seconds",
            "from arrival to the first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmkit_request_duration_seconds", "from arrival to the last byte, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self._window: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def generated(self, model: str, n: int) -> None:
        """Count n new tokens and keep the 10-second rate current."""
        self.tokens.labels(model).inc(n)
        now = time.monotonic()
        with self._lock:
            window = self._window[model]
            window.append((now, n))
            while window and window[0][0] < now - 10:
                window.popleft()
            span = max(now - window[0][0], 1.0) if window else 1.0
            self.tokens_per_second.labels(model).set(sum(k for _, k in window) / span)

    def text(self) -> bytes:
        for model, window in list(self._window.items()):  # a rate decays to 0 once nothing is generated
            with self._lock:
                while window and window[0][0] < time.monotonic() - 10:
                    window.popleft()
                if not window:
                    self.tokens_per_second.labels(model).set(0)
        return generate_latest(self.registry)
