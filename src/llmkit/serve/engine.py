"""The serving engine: one worker thread owns one model and decodes every request it is given together, with
continuous batching (Yu et al. 2022, "Orca"): a new request joins the running batch at the next token step, a
finished one leaves at once.

All running requests share one timeline of KV-cache columns. Each row's tokens sit in a contiguous run of columns
that ends at the current column; a new request's prompt is prefilled on its own (left-padded with the others
admitted in the same step) and copied in so that it ends where the others end:

    column        0   1   2   3   4   5   6   7
    request A     p   p   p   g   g   g   g   ·      (prompt, generated; · the next step)
    request B     -   -   -   -   p   p   g   ·      (admitted two steps ago: its prompt ends at column 5)
    request C     -   -   -   -   -   -   p   ·      (admitted now)

Every row attends only to its own columns (an attention mask) and carries its own positions (position ids), so a
row computes what it would alone; greedy outputs equal the request decoded alone. The cache is preallocated to
`max_batch` rows; rows are kept contiguous (a leaving row's place is taken by the last row), and the timeline is
shifted left when the columns before every row's start are no longer needed, and grown (doubled) when it is full.

A prompt that starts with the tokens of an earlier prompt or answer (a system prompt, the turns of a conversation) is
prefilled only from where it differs: the earlier columns come from the prefix cache (`llmkit.model.prefix`).

Each row samples with its own settings and generator (`Sampler`), stops on its own stop tokens and strings
(`TextStream`), and reports what happens to it through a callback: ("token", piece, token id, logprobs) events, then
one ("done", finish reason, usage) or ("error", kind, message). Encoder-decoders (T5) are decoded one request at a
time on the same worker (beam search and cross-attention do not batch this way).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.generate import GenerationConfig, Sampler, TextStream, constraint_for, generate_seq2seq, seeded_generator, stop_rules
from llmkit.model.compiled import WIDTH_STEP, decode_step
from llmkit.model.layers import KVCache
from llmkit.model.prefix import PrefixCache
from llmkit.threads import release_openmp_threads

log = logging.getLogger("llmkit.serve")


class QueueFull(Exception):
    """Every running slot and every queue place is taken (the server answers 429)."""

    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class TooMany(Exception):
    """More sequences in one request (n x prompts) than running slots and queue places together: never accepted (400)."""

    def __init__(self, asked: int, limit: int):
        super().__init__(f"{asked} sequences asked, at most {limit}")
        self.asked, self.limit = asked, limit


class ShuttingDown(Exception):
    """The server stops: it takes no new request (503)."""


@dataclass
class Request:
    """One sequence to generate (a request with n choices is n of these)."""

    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[tuple], None]  # called from the worker thread with each event
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the k best
    deadline: float | None = None  # time.monotonic() after which the request is stopped (--timeout)
    cancelled: bool = False  # set by the client side (a disconnect): the row leaves at the next step
    submitted: float = field(default_factory=time.monotonic)
    constraint: Any = None  # its grammar (llmkit.grammar.Constraint), prepared off the engine's thread; None: built here

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    req: Request
    text: TextStream
    stop_ids: set[int]
    start: int  # its first column in the timeline
    generated: int = 0
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache


PREFILL_CHUNK = 256  # prompt columns per prefill chunk; see `Engine._admit` and benchmarks/RESULTS.md
PREFIX_CACHE_MB = 256  # the prefix cache's bound (SmolLM2: 46 KB a token, ~5,800 tokens)


@dataclasses.dataclass
class _Prefill:
    """Prompts being prefilled, chunk by chunk, in a cache of their own until they join the batch."""

    reqs: list
    gens: list
    joined: list
    ids: torch.Tensor  # (n, P) left-padded
    mask: torch.Tensor  # (n, P)
    positions: torch.Tensor  # (n, P)
    cache: KVCache
    sampler: Sampler  # their rows' sampler: the batch's when no other row runs, else merged into it
    done: int = 0  # columns prefilled so far


class Engine:
    """Owns `model` (a decoder or an encoder-decoder) on a worker thread; `submit` requests, get events back."""

    def __init__(
        self,
        model,
        name: str,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_tokens: int = 4096,
        prefill_chunk: int | None = PREFILL_CHUNK,
        prefix_cache_mb: float = PREFIX_CACHE_MB,
        metrics=None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise LlmkitError(
                f"max_batch {max_batch} / max_queue {max_queue} are not valid", "use --max-batch 1 or more and --max-queue 0 or more"
            )
        self.model, self.name, self.tok = model, name, model.tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        if prefill_chunk is not None and prefill_chunk < 1:
            raise LlmkitError(f"prefill_chunk {prefill_chunk} is not valid", "use --prefill-chunk 1 or more (e.g. 256)")
        self.prefill_chunk = prefill_chunk  # prompt columns prefilled between two decode steps (None: a prompt at once)
        self._prefill: _Prefill | None = None  # the prompts being prefilled, chunk by chunk
        self.metrics = metrics
        cfg = model.config
        self.seq2seq = cfg.family == "encoder-decoder"
        # earlier prompts' and answers' keys and values (decoders; 0 MB: none)
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and not self.seq2seq else None
        self._to_keep: list[tuple] = []  # prefilled prompts' columns, kept once their first tokens are out
        # the compiled one-token step (`use_compiled_decode`): rows padded to a power of two, one graph per such batch
        self.compiled = bool(getattr(model, "compiled_decode", False)) and not self.seq2seq
        self.context = None if cfg.position == "relative" else cfg.max_seq_len
        self.device = next(model.parameters()).device
        self.n_valid = min(self.tok.id_limit, cfg.vocab_size)
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row] = []
        self.lock = threading.Condition()
        self.closing = False
        self.durations: collections.deque[float] = collections.deque(maxlen=50)  # recent request times, for Retry-After
        self._cap = self.width = 0  # timeline columns allocated, and in use
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (max_batch, cap): 1 where a row has a token
        self._joining = 0  # taken from the queue, not yet in the batch (being prefilled)
        self._admitting: list[Request] = []  # those requests (they get an error if the prefill fails)
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.warm = threading.Event()  # set when the worker runs: the compiled steps build in the background meanwhile
        self.jobs: dict = {}  # padded batch size -> its CompileJob (the compiled step is used once that is ready)
        self._built_since: dict[int, float] = {}  # when each built step began to wait for an idle moment to load
        release_openmp_threads()  # the creating thread's idle OpenMP team (from loading the model) would slow every step
        self.thread = threading.Thread(target=self._run, name=f"llmkit-engine-{name}", daemon=True)
        self.thread.start()

    # --- the client side (any thread) -------------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Queue `requests` (the n choices of one API request: all or none). Raises QueueFull or ShuttingDown."""
        with self.lock:
            if self.closing:
                raise ShuttingDown()
            if len(requests) > self.max_batch + self.max_queue:
                raise TooMany(len(requests), self.max_batch + self.max_queue)
            free = self.max_batch - len(self.rows) - self._joining
            if len(self.waiting) + len(requests) - max(free, 0) > self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.extend(requests)
            self._gauges()
            self.lock.notify()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time for the queue to move by one batch."""
        typical = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return max(1, math.ceil(typical))

    @property
    def running(self) -> int:
        """Requests decoding, and those being prefilled to join them."""
        return len(self.rows) + len(self._admitting)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self, wait: float = 5.0) -> None:
        """Stop taking requests, cancel whatever still runs or waits (and any compile of a step it would have used), and
        end the worker."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        for job in self.jobs.values():
            if job.built.is_set() or not job.done.is_set():
                job.cancel()
        self.thread.join(wait)

    # --- the worker --------------------------------------------------------------------------------------------------

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.labels(self.name).set(len(self.waiting))
            self.metrics.running.labels(self.name).set(len(self.rows))
            jobs = self.jobs.values()
            self.metrics.compiled_steps.labels(self.name, "in_use").set(sum(job.ready.is_set() for job in jobs))
            self.metrics.compiled_steps.labels(self.name, "building").set(sum(not job.done.is_set() for job in jobs))

    def _start_compiles(self) -> None:
        """The compiled decode step for every padded batch size (1, 2, 4, ... max_batch). By default a background process
        compiles them into inductor's cache on disk, smallest first, while the engine serves eagerly; each is then
        loaded into this process (seconds) when the engine is idle (`_load_compiled`) and used from its next step.
        LLMKIT_COMPILE=always (`compiled_decode` True) compiles them all here before the first request instead."""
        if self.model.compiled_decode == "eager":
            return
        from llmkit.model.compiled import compile_step

        now = self.model.compiled_decode is True
        n = 1
        while True:
            say = lambda m, n=n: log.info("%s, batches of %d: %s", self.name, n, m)  # noqa: E731
            background = False if now else "process"
            self.jobs[n] = compile_step(self.model, n, background=background, hold=True, log=say)
            if n >= self.max_batch:
                break
            n = min(self.max_batch, 2 * n)

    def _load_compiled(self, idle: bool) -> None:
        """Load a compiled step a background process has built: when the engine is idle, or after it has waited 30 s
        for an idle moment (the running rows then pause for the load's seconds once; decoding beside it would crawl)."""
        for n, job in self.jobs.items():
            if job.built.is_set() and not job.done.is_set():
                since = self._built_since.setdefault(n, time.monotonic())
                if idle or time.monotonic() - since > 30:
                    job.load()
                    self._gauges()
                return

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            if self.compiled:
                self._start_compiles()
        except Exception as e:  # noqa: BLE001  (decode eagerly rather than not at all)
            log.error("%s: the compiled decode step failed (%s); decoding eagerly", self.name, e)
            self.compiled = False
        finally:
            self._gauges()
            self.warm.set()
        logits = None
        while True:
            with self.lock:
                while not self.closing and not self.waiting and not self.rows and self._prefill is None and not self._loadable():
                    self.lock.wait(1.0 if any(not job.done.is_set() for job in self.jobs.values()) else None)
                if self.closing:
                    break
            try:
                if self._loadable():
                    self._load_compiled(idle=not self.rows and not self.waiting)
                if self.seq2seq:
                    self._one_seq2seq()
                    continue
                logits = self._admit(logits)
                if self.rows and logits is not None:
                    logits = self._step(logits)
                self._keep_prompts()
            except Exception as e:  # a bug or an out-of-memory must not leave clients waiting forever
                log.exception("engine %s failed", self.name)
                for req in [row.req for row in self.rows] + self._admitting:
                    self._finish_error(req, "server_error", f"generation failed: {type(e).__name__}: {e}")
                with self.lock:
                    self.rows, self._admitting, self._joining = [], [], 0
                    self.width = 0
                    self._gauges()
                logits = None
        for row in self.rows:
            self._finish_error(row.req, "shutdown", "the server is shutting down")
        with self.lock:
            left, self.waiting = list(self.waiting), collections.deque()
        for req in left:
            self._finish_error(req, "shutdown", "the server is shutting down")
        self.rows = []

    def _loadable(self) -> bool:
        """A background process has built a compiled step this engine has not loaded yet."""
        return any(job.built.is_set() and not job.done.is_set() for job in self.jobs.values())

    def _finish_error(self, req: Request, kind: str, message: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind).inc()
        req.emit(("error", kind, message))

    def _expired(self, req: Request, now: float) -> str | None:
        if req.cancelled:
            return "cancelled"
        if req.deadline is not None and now > req.deadline:
            return "timeout"
        return None

    def _take(self, limit: int) -> list[Request]:
        """Waiting requests that join now: while a slot is free and the prefill budget (padded prompt tokens) lasts;
        at least one, however long its prompt. A request whose prompt starts as a prefix-cache entry joins alone (its
        prefill starts where the entry ends; prompts prefilled together are padded to one start)."""
        taken: list[Request] = []
        now = time.monotonic()
        with self.lock:
            while self.waiting and len(taken) < limit:
                req = self.waiting[0]
                gone = self._expired(req, now)
                if gone:
                    self.waiting.popleft()
                    if gone == "timeout":
                        self._finish_error(req, "timeout", "the request timed out while it waited in the queue")
                    continue
                width = max(len(r.prompt_ids) for r in [*taken, req])
                if taken and width * (len(taken) + 1) > self.prefill_tokens:
                    break
                hit = self.prefix is not None and self.prefix.longest(req.prompt_ids) > 0
                if hit and taken:  # it joins alone, next
                    break
                taken.append(self.waiting.popleft())
                if hit:
                    break
            self._joining = len(taken)
            self._admitting = taken
            self._gauges()
        return taken

    def withdraw(self, req: Request) -> None:
        """A client left: its request leaves the queue now, or its row at the next step."""
        req.cancel()
        with self.lock:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
            self._gauges()

    def _generators(self, reqs: list[Request]) -> list[torch.Generator | None]:
        """Each row its own generator: seeded by the request, else from the system's randomness."""
        return [seeded_generator(r.config.seed if r.config.seed is not None else secrets.randbits(63), self.device) for r in reqs]

    def _alloc(self, cap: int) -> None:
        """(Re)allocate the cache to `cap` columns, keeping what the running rows hold."""
        cfg = self.model.config
        dtype = self.model.embed.tokens.weight.dtype
        spare = WIDTH_STEP if self.compiled else 0  # the compiled step attends to fewer columns than the buffers hold
        shape = (self.max_batch, cfg.n_kv_heads, cap + spare, cfg.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.n_layers)]
        if self._cap and self.rows:
            w, b = self.width, len(self.rows)
            for i in range(cfg.n_layers):
                k[i][:b, :, :w] = self._k[i][:b, :, :w]
                v[i][:b, :, :w] = self._v[i][:b, :, :w]
        mask = torch.zeros(self.max_batch, cap, dtype=torch.long, device=self.device)
        if self._cap and self.rows:
            mask[:, : self.width] = self.mask[:, : self.width]
        self._k, self._v, self.mask, self._cap = k, v, mask, cap

    def _shift(self, by: int) -> None:
        """Move every row's columns by `by` (negative: left, dropping columns no row uses; positive: right)."""
        b, w = len(self.rows), self.width
        for t in self._k + self._v:
            if by < 0:
                t[:b, :, : w + by] = t[:b, :, -by:w].clone()
            else:
                t[:b, :, by : w + by] = t[:b, :, :w].clone()
                t[:b, :, :by] = 0
        if by < 0:
            self.mask[:, : w + by] = self.mask[:, -by:w].clone()
            self.mask[:, w + by : w] = 0
        else:
            self.mask[:, by : w + by] = self.mask[:, :w].clone()
            self.mask[:, :by] = 0
        for row in self.rows:
            row.start += by
        self.width = w + by

    def _grow(self, need: int) -> None:
        if need > self._cap:
            cap = max(256, self._cap)
            while cap < need:
                cap *= 2
            self._alloc(cap)

    def _room(self) -> None:
        """Make room for one more column: drop the leading columns no row uses once they are many (or the cache is
        full), else grow the cache."""
        start = min((r.start for r in self.rows), default=0)
        if start and (self.width + 1 > self._cap or start >= max(32, self.width // 2)):
            self._shift(-start)
        self._grow(self.width + 1)

    def _cache(self):
        """A KVCache view of the running rows (no copy: slices of the preallocated buffers)."""

        b = len(self.rows)
        return KVCache.over([t[:b] for t in self._k], [t[:b] for t in self._v], self._cap, self.width)

    def _admit(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Prefill waiting requests and join them to the batch; returns every row's next-token logits.

        A long prompt is prefilled `prefill_chunk` columns at a time, one chunk between two decode steps of the running
        rows (chunked prefill, as vLLM and llama.cpp do): a 3,000-token prompt never stops the others' streams for the
        whole of its prefill. Everything that belongs to the new requests alone (their generators, stop rules, the
        prefill in a cache of their own) is done apart: if it fails, only they get the error and the running rows go on."""
        if self._prefill is None:
            reqs = self._take(self.max_batch - len(self.rows))
            if not reqs:
                return logits
            self._prefill = self._guarded(reqs, lambda: self._start_prefill(reqs))
            if self._prefill is None:
                return logits
        pre = self._prefill
        new_logits = self._guarded(pre.reqs, lambda: self._prefill_chunk(pre))
        if new_logits is None:  # more chunks to go (or it failed: the requests have their error)
            return logits
        self._prefill = None
        self._join(pre)
        return new_logits if logits is None else torch.cat([logits, new_logits])

    def _guarded(self, reqs: list[Request], work):
        """`work()`, or None after giving `reqs` (and only them) the error it raised (their prefill is dropped)."""
        try:
            return work()
        except Exception as e:  # noqa: BLE001  (these requests fail; the batch goes on)
            log.exception("engine %s: a prefill failed", self.name)
            for r in reqs:
                self._finish_error(r, "server_error", f"the prompt could not be processed: {type(e).__name__}: {e}")
            with self.lock:
                self._joining, self._admitting = 0, []
                self._gauges()
            self._prefill = None
            return None

    def _start_prefill(self, reqs: list[Request]) -> _Prefill:
        """The new requests' sampler settings (checked alone), stop rules and left-padded prompts in a cache of their own."""
        gens = self._generators(reqs)
        joined, grammars = [], []
        for r in reqs:
            stop_ids, strings = stop_rules(self.tok, r.config, self.model, warn=log.warning)
            text = TextStream(self.tok, strings)
            text.prompt_ids = r.prompt_ids
            joined.append(_Row(r, text, stop_ids, start=0))
            grammars.append(r.constraint if r.constraint is not None else constraint_for(r.config, self.tok, self.n_valid, stop_ids))
        # their settings, checked alone
        sampler = Sampler([r.config for r in reqs], self.n_valid, self.device, generators=gens, constraints=grammars)
        P, n = max(len(r.prompt_ids) for r in reqs), len(reqs)
        ids = torch.full((n, P), self.tok.pad_id if self.tok.pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros(n, P, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, P - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, P - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pre = _Prefill(reqs, gens, joined, ids, mask, positions, self.model.new_cache(n, P), sampler)
        if self.prefix is not None and n == 1:  # a lone prompt (no padding): prefilled from where a cached start ends
            pre.done = joined[0].cached = self.prefix.restore(reqs[0].prompt_ids, pre.cache)
        return pre

    def _prefill_chunk(self, pre: _Prefill) -> torch.Tensor | None:
        """The next chunk of the prompts through the model: their last position's logits once the prompts are done."""
        P = pre.ids.shape[1]
        end = P if self.prefill_chunk is None else min(P, pre.done + self.prefill_chunk)
        plain = pre.ids.shape[0] == 1  # one prompt, no padding: the causal fast path, exactly as `llmkit generate` computes it
        out = self.model(
            pre.ids[:, pre.done : end],
            attention_mask=None if plain else pre.mask[:, :end],
            cache=pre.cache,
            position_ids=None if plain else pre.positions[:, pre.done : end],
            last_only=True,
            check_ids=False,
        )[:, -1]
        pre.done = end
        return out if end == P else None

    def _join(self, pre: _Prefill) -> None:
        """Place the prefilled rows so that their prompts end at the current column (the others move right if a prompt
        is longer), with their sampler rows."""
        reqs, n, P = pre.reqs, len(pre.reqs), pre.ids.shape[1]
        if not self.rows:
            self.width = 0
        if P > self.width:
            self._grow(P + 1)
            self._shift(P - self.width)
        b, w = len(self.rows), self.width
        for i in range(len(self._k)):
            self._k[i][b : b + n, :, w - P : w] = pre.cache.k[i]
            self._v[i][b : b + n, :, w - P : w] = pre.cache.v[i]
        self.mask[b : b + n] = 0
        self.mask[b : b + n, w - P : w] = pre.mask
        configs = [r.config for r in reqs]
        if not self.rows:
            self.sampler = pre.sampler
            self.positions = pre.positions[:, -1:] + 1
        else:
            self.sampler.add_rows(configs, pre.gens, pre.sampler.constraints)
            self.positions = torch.cat([self.positions, pre.positions[:, -1:] + 1])
        self.sampler.add_prompts([r.prompt_ids for r in reqs], rows=list(range(b, b + n)))
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels(self.name).inc(sum(len(r.prompt_ids) for r in reqs))
        for row in pre.joined:
            row.start = w - len(row.req.prompt_ids)
        if self.prefix is not None:  # each prompt's columns, for a later prompt that starts the same: kept once its
            for i, r in enumerate(reqs):  # first token is out (the copy would delay it), `_keep_prompts`
                first = P - len(r.prompt_ids)
                self._to_keep.append((r.prompt_ids, [k[i, :, first:P] for k in pre.cache.k], [v[i, :, first:P] for v in pre.cache.v]))
        with self.lock:
            self.rows = self.rows + pre.joined
            self._joining, self._admitting = 0, []
        self._gauges()

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[tuple | None]:
        """(chosen token's log-probability, [(id, logprob) of the k best]) for the rows that asked; the model's own
        distribution (before temperature and filters), as OpenAI reports it."""
        want = [r.req.logprobs for r in self.rows]
        if all(k is None for k in want):
            return [None] * len(want)
        lp = logits[:, : self.n_valid].float().log_softmax(-1)
        chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(x or 0 for x in want)
        top = lp.topk(k, dim=-1) if k else None
        out: list[tuple | None] = []
        for r, kr in enumerate(want):
            if kr is None:
                out.append(None)
                continue
            best = list(zip(top.indices[r, :kr].tolist(), top.values[r, :kr].tolist())) if kr and top is not None else []
            out.append((chosen[r], best))
        return out

    def _poisoned(self, logits: torch.Tensor) -> list[int]:
        """Rows whose logits hold NaN (a numerical failure of that row alone): they end with an error, the rest go on."""
        bad = torch.isnan(logits[:, : self.n_valid]).any(-1)
        return bad.nonzero()[:, 0].tolist() if bool(bad.any()) else []

    def _step(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Sample every row's next token, report it, let finished rows leave, and compute the next logits. A row whose
        logits are not numbers, or whose stop rule or stream fails, ends alone with its error: one request never fails
        another."""
        poisoned = self._poisoned(logits)
        if poisoned:
            for r in poisoned:
                self._finish_error(
                    self.rows[r].req, "server_error", "generation failed: the model's scores for this request are not numbers"
                )
            keep = [r for r in range(len(self.rows)) if r not in poisoned]
            self._drop(keep)
            if not self.rows:
                self._gauges()
                return None
            logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]
        tokens = self.sampler(logits)
        self.sampler.observe(tokens)
        lps = self._logprobs(logits, tokens)
        now = time.monotonic()
        keep, produced = [], 0
        for r, (row, t) in enumerate(zip(self.rows, tokens.tolist())):
            try:
                finish, made = self._advance(row, t, lps[r], now)
            except Exception as e:  # noqa: BLE001  (this request fails alone)
                log.exception("engine %s: a request's step failed", self.name)
                self._finish_error(row.req, "server_error", f"generation failed: {type(e).__name__}: {e}")
                continue
            produced += made
            if finish is None:
                keep.append(r)
            elif finish in ("stop", "length") and self.prefix is not None:
                self._keep_prefix(r, row)
        if self.metrics is not None:
            self.metrics.generated(self.name, produced)
        if len(keep) < len(self.rows):
            self._drop(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=self.device)] if keep else tokens[:0]
        if not self.rows:
            self._gauges()
            return None
        self._room()
        b, w = len(self.rows), self.width
        self.mask[:b, w] = 1
        plain = b == 1 and self.rows[0].start == 0  # a lone row from column 0: exactly `llmkit generate`'s path
        n = min(self.max_batch, 1 << (b - 1).bit_length())  # padding rows see only column 0 and are dropped
        job = self.jobs.get(n)
        ready = job is not None and job.ready.is_set()
        if self.compiled and (ready or self.model.compiled_decode == "eager"):  # the static step: compiled, or "eager" (tests)
            pad = torch.zeros(n - b, dtype=torch.long, device=self.device)
            valid = self.mask[:n].bool()
            valid[b:, 0] = True
            out = decode_step(
                self.model,
                [t[:n] for t in self._k],
                [t[:n] for t in self._v],
                torch.cat([tokens, pad]),
                torch.cat([self.positions[:, 0], pad]),
                w,
                valid,
                step=job.step if ready else None,  # type: ignore[union-attr]
            )[:b]
        else:
            out = self.model(
                tokens[:, None],
                attention_mask=None if plain else self.mask[:b, : w + 1],
                cache=self._cache(),
                position_ids=None if plain else self.positions,
                check_ids=False,
            )[:, -1]
        self.width += 1
        self.positions = self.positions + 1
        return out

    def _advance(self, row: _Row, t: int, lp, now: float) -> tuple[str | None, int]:
        """Token `t` for `row`: its text piece out, and whether the row is over ("stop", "length", "gone"); (finish,
        tokens produced)."""
        gone = self._expired(row.req, now)
        if gone:
            if gone == "timeout":
                self._finish_error(row.req, "timeout", f"the request timed out after {row.generated} tokens")
            self._done_metrics(row, cancelled=True)
            return "gone", 0
        finish, stop_token, made = None, t in row.stop_ids, 0
        if stop_token:  # not part of the output: it ends it
            piece, finish = row.text.flush(), "stop"
        else:
            piece = row.text.push(t)
            row.generated += 1
            if row.text.stopped:
                finish = "stop"
            elif row.generated >= row.req.config.max_new_tokens:
                piece += row.text.flush()
                finish = "length"
            if row.generated == 1 and self.metrics is not None:
                self.metrics.ttft.labels(self.name).observe(now - row.req.submitted)
            made = 1
        if piece or not stop_token:
            row.req.emit(("token", piece, None if stop_token else t, None if stop_token else lp))
        if finish:
            usage = {"prompt_tokens": len(row.req.prompt_ids), "completion_tokens": row.generated, "cached_tokens": row.cached}
            row.req.emit(("done", finish, usage))
            self._done_metrics(row)
        return finish, made

    def _keep_prompts(self) -> None:
        """The prompts prefilled since the last step, into the prefix cache (after their first tokens went out)."""
        while self._to_keep:
            self.prefix.add(*self._to_keep.pop(0))  # type: ignore[union-attr]

    def _keep_prefix(self, r: int, row: _Row) -> None:
        """A finished answer's columns (its prompt and the tokens fed after it: all but the last one sampled), for the
        conversation's next turn, which starts with them."""
        fed = self.width - row.start
        ids = (row.req.prompt_ids + row.text.ids)[:fed]
        if len(ids) == fed:
            self.prefix.add(ids, [k[r, :, row.start : self.width] for k in self._k], [v[r, :, row.start : self.width] for v in self._v])  # type: ignore[union-attr]

    def _done_metrics(self, row: _Row, cancelled: bool = False) -> None:
        if not cancelled:
            self.durations.append(time.monotonic() - row.req.submitted)

    def _drop(self, keep: list[int]) -> None:
        """Keep rows `keep` (in order) as rows 0..len(keep)-1 of the cache."""
        b = len(self.rows)
        for dst, src in enumerate(keep):
            if dst != src:
                for t in self._k + self._v:
                    t[dst].copy_(t[src])
                self.mask[dst] = self.mask[src]
        self.mask[len(keep) : b] = 0
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.positions = self.positions.index_select(0, index)
        self.sampler.keep_rows(keep)
        self.rows = [self.rows[i] for i in keep]
        self._gauges()

    def _one_seq2seq(self) -> None:
        """Encoder-decoders: the next waiting request, decoded alone (its text comes as one piece)."""
        reqs = self._take(1)
        if not reqs:
            return
        req = reqs[0]
        with self.lock:
            self.rows = [_Row(req, TextStream(self.tok, []), set(), 0)]
            self._joining, self._admitting = 0, []
            self._gauges()
        try:
            g = generate_seq2seq(self.model, self.tok, req.prompt_ids, req.config, warn=log.warning)
        except Exception as e:  # noqa: BLE001  (the client gets the error; the worker goes on)
            log.exception("engine %s failed", self.name)
            self._finish_error(req, "server_error", f"generation failed: {type(e).__name__}: {e}")
            return
        finally:
            with self.lock:
                self.rows = []
                self._gauges()
        if req.cancelled:
            return
        if self.metrics is not None:
            self.metrics.ttft.labels(self.name).observe(time.monotonic() - req.submitted)
            self.metrics.generated(self.name, len(g.ids))
        req.emit(("token", g.text, None, None))
        req.emit(("done", g.finish_reason, {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(g.ids)}))
        self.durations.append(time.monotonic() - req.submitted)
