"""One decoding step of a decoder, compiled: a static-shape KV cache and `torch.compile` (inductor's C++ backend on a
CPU, CUDA graphs on a GPU).

Decoding one token runs a few hundred small kernels; in eager PyTorch the Python between them costs as much as the
matrix multiplies. Compiled, the step is one graph: the norms, RoPE, residual adds and activations fuse into a few C++
loops around the matrix-multiply and attention kernels, called from C++ (`cpp_wrapper`): no Python runs between
layers, and dynamo's guards skip the model's modules (each model has its compiled step of its own).

    prefill (eager)   the prompt through the model, its keys and values written into the cache's first columns
    step (compiled)   token (B,) at column c, RoPE/learned position p (B,) -> logits (B, V)
                      keys and values written at column c in place; attention over columns [0, W) where W is c + 1
                      rounded up to a multiple of 64 (a dynamic size: one graph for every width), masked per row

The graph is compiled once per model, batch size and dtype; the first step pays the compile (about two minutes for
SmolLM2 on 2 cores, seconds once inductor's cache on disk holds it). Every decoder with pre-norm blocks and
absolute or rotary positions (not dynamic NTK) compiles; others decode eagerly, with the same results.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import threading
import time
import types
import weakref
from pathlib import Path

import torch
from torch import nn

from llmkit.model.families import softcap
from llmkit.model.layers import KVCache
from llmkit.model.weights import load as load_model
from llmkit.threads import release_openmp_threads

WIDTH_STEP = 64  # attention runs over the filled columns rounded up to this


def compilable(model: nn.Module) -> str | None:
    """None when `model`'s decode step compiles, else why not."""
    cfg = model.config
    if cfg.family != "decoder":
        return f"a {cfg.family} model"
    if cfg.norm_position != "pre":
        return "post-norm blocks"
    if cfg.position == "relative":
        return "relative position biases"
    if (cfg.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope"):
        return f"{cfg.rope_scaling['rope_type']} RoPE (its frequencies depend on the length)"
    if cfg.fp16_clamp:
        return "float16 clamping"
    if not hasattr(torch, "compile"):
        return "torch.compile is missing (torch < 2.0)"
    return None


class _ColumnCache(KVCache):
    """The KVCache interface over static buffers: `update` writes one column in place (a tensor index, so one graph
    serves every step) and returns the first `width` columns."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], column: torch.Tensor, width: int):
        self.k, self.v, self.column, self.width = k, v, column, width
        self.cross = [None] * len(k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.column, k)  # (B, nkv, C, hd) <- (B, nkv, 1, hd) at `column`
        self.v[layer].index_copy_(2, self.column, v)
        return self.k[layer][:, :, : self.width], self.v[layer][:, :, : self.width]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """One query per row: q (B, nh, 1, hd), k/v (B, nkv, W, hd), bias (B, 1, 1, W) -> (B, nh, 1, hd). Written as
        two small matrix products and a softmax, which the compiler fuses; each group of query heads meets its shared
        key/value head without copies."""
        B, nh, _, hd = q.shape
        nkv = k.shape[1]
        qg = q.reshape(B, nkv, nh // nkv, hd)  # (B, nkv, rep, hd): the query heads of each key/value head
        scores = (qg.float() @ k.float().transpose(-2, -1)) * scale + bias.reshape(B, 1, 1, -1).float()  # (B, nkv, rep, W)
        y = scores.softmax(-1) @ v.float()  # (B, nkv, rep, hd), accumulated in float32 as SDPA does
        return y.to(q.dtype).reshape(B, nh, 1, hd)


def _step(model, ks, vs, tokens, positions, column, valid) -> torch.Tensor:
    """tokens (B,), positions (B,), column (1,), valid (B, W) bool: which cached columns each row sees -> logits (B, V)."""
    cache = _ColumnCache(ks, vs, column, valid.shape[1])
    x = model.embed(tokens[:, None], positions[:, None], check=False)  # (B, 1, D)
    rope = model.rotary(positions[:, None]) if model.rotary is not None else None
    bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None]
    local_bias, local_rope = bias, rope
    if model.config.sliding_window is not None:  # windowed layers: only the last `window` columns (each row's are contiguous)
        seen = valid & (torch.arange(valid.shape[1], device=x.device) > column - model.config.sliding_window)
        local_bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~seen, torch.finfo(x.dtype).min)[:, None, None]
        if model.rotary_local is not None:
            local_rope = model.rotary_local(positions[:, None])
    for i, block in enumerate(model.blocks):
        b, r = model.layer_inputs(i, bias, rope, local_bias, local_rope)
        x, _ = block(x, bias=b, rope=r, cache=cache, layer=i)  # (B, 1, D)
    if model.norm is not None:
        x = model.norm(x)
    return softcap(model.lm_head(x)[:, 0], model.config.logit_softcap)  # (B, V)


_TOLD_EAGER: weakref.WeakSet = weakref.WeakSet()  # models whose user heard why they decode eagerly
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Entry: its structure, compiled step, jobs
_COMPILING = threading.Lock()  # the registry
_RUNNING = threading.Lock()  # one compile at a time: dynamo and inductor share their caches, and two cores gain nothing
_CHILD = threading.Condition()  # one background compile process at a time, in the order they were asked for
_TICKETS = [0, 0]  # [next ticket to give, ticket whose turn it is]


def _structure(model: nn.Module) -> tuple:
    """What the compiled step of `model` assumes and, with the module guards skipped, no guard checks: its config,
    each module's type, plain attributes (training, LoRA's merged flag, scalings...) and hooks, and each weight's
    name, dtype, device, shape and strides."""
    modules = tuple(
        (
            name,
            type(m),
            tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))))),
            tuple(len(h) for h in (m._forward_hooks, m._forward_pre_hooks)),
        )
        for name, m in model.named_modules()
    )
    tensors = tuple((n, t.dtype, t.device, tuple(t.shape), t.stride()) for n, t in (*model.named_parameters(), *model.named_buffers()))
    return repr(model.config), modules, tensors


class CompileJob:
    """A model's decode step compiled for one batch size: `ready` once it runs compiled, `done` once the compile ended
    (`error` says why it failed: the step then decodes eagerly), `seconds` what it took. A job built by a child process
    (`compile_step(background="process")`) sets `built` when inductor's cache on disk holds the step; loading it into
    this process (seconds) follows at once, or waits for `load()` (`hold=True`) so that it runs when this process is
    idle. `loading` is set while that load runs: decoding meanwhile would crawl (both need the interpreter)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.ready, self.done, self.built, self.loading = threading.Event(), threading.Event(), threading.Event(), threading.Event()
        self.error: str | None = None
        self.seconds: float | None = None
        self.step = None  # the compiled function, once ready
        self._load = None  # set by compile_step: loads (or compiles) the step in the calling thread
        self._lock = threading.Lock()  # two engines of one model (one model served under two names) load it once
        self.process = None  # the child process building the step, while it runs

    def load(self) -> None:
        """Load the compiled step into this process now (after a child process built it; no-op when done)."""
        with self._lock:
            if self._load is not None and not self.done.is_set():
                self._load()

    def cancel(self) -> None:
        """Stop a compile nobody will use (its engine closed): the child process ends, the job lets its model go."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
            if not self.done.is_set():
                self.error = self.error or "cancelled"
                self._load = None
                self.done.set()


class _Entry:
    def __init__(self, structure, step):
        self.structure, self.step = structure, step
        self.jobs: dict[int, CompileJob] = {}


def _new_step(device: torch.device):
    """A fresh torch.compile of `_step`: a function of its own, since dynamo keeps compiled code per code object, so
    models never share graphs or guards.

    Dynamo checks guards before every call; on a model's ~300 weights they cost 0.64 ms per token (SmolLM2). Since this
    copy only ever sees one model, the guards on its modules are dropped (`skip_guard_on_all_nn_modules_unsafe`; the KV
    cache's, tokens' and mask's shapes and dtypes are still checked), and a change they would have caught (modules
    replaced, train mode, a LoRA merge, a cast, a new config) is caught by `compile_step` instead: `_structure`
    differs, so a fresh copy compiles. On a CPU the compiled step calls its kernels from C++ (`cpp_wrapper`)."""
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    step = types.FunctionType(_step.__code__.replace(), _step.__globals__, "_step", _step.__defaults__, _step.__closure__)
    options: dict = {}
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
    if skip_module_guards is not None:
        options["guard_filter_fn"] = skip_module_guards
    if device.type == "cpu":
        options["cpp_wrapper"] = True
        # no size and stride assertions on each of the ~800 inputs at every call (0.3-0.5 ms a token on SmolLM2):
        # dynamo's guards check the caches' and tokens' shapes, and `_structure` the weights' shapes and strides
        options["size_asserts"] = False
    elif device.type == "cuda":
        options["triton.cudagraphs"] = True  # mode="reduce-overhead": CUDA graphs
    return torch.compile(step, fullgraph=True, dynamic=False, options=options)


def _cache_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters())
    return p.dtype if p.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _warm_up(model: nn.Module, step, batch: int) -> None:
    """Run the compiled step once on caches of its own (compiling it, or loading it from inductor's cache on disk): the
    lengths are dynamic, so the graph serves every real cache of this batch size."""
    cfg = model.config
    p = next(model.parameters())
    shape = (batch, cfg.n_kv_heads, 2 * WIDTH_STEP, cfg.head_dim)
    ks = [torch.zeros(shape, dtype=_cache_dtype(model), device=p.device) for _ in range(cfg.n_layers)]
    vs = [torch.zeros_like(k) for k in ks]
    tokens = torch.zeros(batch, dtype=torch.long, device=p.device)
    valid = torch.zeros(batch, 1, dtype=torch.bool, device=p.device)
    valid[:, 0] = True
    with torch.no_grad():
        decode_step(model, ks, vs, tokens, tokens.clone(), 0, valid, step=step)


# --- what a compile costs on this machine (remembered beside inductor's own cache, so clearing one clears both) ----


def _records_path() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "llmkit-decode-compiles.json"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of the code the step is traced from (this module, the layers, the model families, the GGUF blocks): an
    llmkit whose step changed compiles it anew, and says so, instead of promising a load from the cache."""
    here = Path(__file__).parent
    digest = hashlib.sha1()
    for name in ("compiled.py", "layers.py", "families.py", "quantize.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def _record_key(model: nn.Module, batch: int) -> str:
    """The model's kind of step (config, layer types, dtype), batch size and llmkit's code of it: the same before and
    after its GGUF blocks are swapped in."""
    kinds = {type(m).__name__ for m in model.modules()}
    blocks = "BlockLinear" in kinds or bool(getattr(model, "pending_gguf_blocks", False))
    kinds -= {"Linear", "BlockLinear"}  # a model with its blocks pending still has plain Linear layers: one key for both
    what = (torch.__version__, _code_version(), repr(model.config), sorted(kinds), blocks, str(_cache_dtype(model)), batch)
    return hashlib.sha1(repr(what).encode()).hexdigest()[:16]


def _read_records() -> dict:
    try:
        return json.loads(_records_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def compile_estimate(model: nn.Module, batch: int) -> tuple[float, bool]:
    """(seconds a compile of `model`'s step for `batch` rows is expected to take here, whether inductor's cache on disk
    is expected to hold it). Measured times of earlier compiles on this machine when there are any (the first, cold;
    later ones load from the cache); else a guess from the model's depth (SmolLM2's 30 layers: about 90-130 s cold and
    8-10 s warm on 2 cores, benchmarks/RESULTS.md)."""
    record = _read_records().get(_record_key(model, batch))
    if record:
        return float(record.get("warm_s") or 0.1 * record["cold_s"]), True
    return 10.0 + 3.5 * model.config.n_layers, False


def _what(cached: bool) -> str:
    return "loading the compiled decode step from the cache" if cached else "compiling the decode step for this machine, once"


def _remember(model: nn.Module, batch: int, seconds: float, cached: bool) -> None:
    from llmkit import io

    records = _read_records()
    key = _record_key(model, batch)
    entry = records.setdefault(key, {"cold_s": seconds})
    if cached:
        entry["warm_s"] = seconds
    try:
        io.write_json(_records_path(), records)
    except OSError:  # a read-only cache: the next estimate is a guess again
        pass


def compile_step(model: nn.Module, batch: int, *, background: bool | str = False, hold: bool = False, log=None) -> CompileJob:
    """Compile `model`'s decode step for `batch` rows. One job per model and batch size while the model stays as it is;
    a changed model (`_structure`) compiles afresh.

        background=False       now, in this thread (a compile error is raised)
        background="thread"    in a thread of this process (True means the same); the caller decodes eagerly meanwhile
                               and switches when `job.ready` is set. Both need the interpreter, so on a small machine
                               eager decoding crawls meanwhile (SmolLM2: 2.7 against 26 tokens/s)
        background="process"  a child process at low priority loads the same model and compiles it into inductor's
                               cache on disk (eager decoding here keeps its interpreter; 9 against 26 tokens/s on 2
                               cores); then this process loads the step from the cache (~10 s), at once, or at
                               `job.load()` with `hold`. A model not loaded from a name or path compiles in a thread.

    `log(message)` hears one line when a compile starts (with its expected time and the cache's place) and one when it
    ends. A model waiting for its GGUF blocks (`prepare_for_decoding`) gets them first, in the compiling thread (each
    layer swapped in one assignment: an eager step meanwhile computes the same)."""
    device = next(model.parameters()).device
    mode = "thread" if background is True else (background or None)
    if mode not in (None, "thread", "process"):
        raise ValueError(f"background must be False, 'thread' or 'process', not {background!r}")
    if mode == "process" and (getattr(model, "decode_spec", None) is None or device.type != "cpu"):
        mode = "thread"  # a GPU's step compiles beside its decoding: the GPU, not the interpreter, does the work
    with _COMPILING:
        job = _current_job(model, batch)
        if job is not None:
            return job
        entry = _COMPILED.get(model)
        job = CompileJob(batch)
        if entry is None or _needs_fresh(entry, model):
            entry = _COMPILED[model] = _Entry(None, _new_step(device))
        entry.jobs[batch] = job

    def say(message: str) -> None:
        if log is not None:
            log(message)

    def compile_here(where: str = "") -> None:
        started = time.monotonic()
        job.loading.set()
        try:
            with _RUNNING:
                if getattr(model, "pending_gguf_blocks", False):
                    from llmkit.model.quantize import use_gguf_blocks

                    use_gguf_blocks(model)
                    model.pending_gguf_blocks = False
                estimate, cached = compile_estimate(model, batch)
                say(f"{_what(cached)}{where}: ~{estimate:.0f} s (cache: {_cache_dir()})")
                entry.structure = _structure(model)
                ticking = threading.Event()
                if mode is None:  # the caller waits: say how far it is
                    threading.Thread(target=_tick, args=(ticking, started, estimate, say, 20.0, cached), daemon=True).start()
                try:
                    _warm_up(model, entry.step, batch)
                finally:
                    ticking.set()
            job.seconds = time.monotonic() - started
            _remember(model, batch, job.seconds, cached)
            job.step = entry.step
            job.ready.set()
            say(f"the compiled decode step is ready ({job.seconds:.0f} s)")
        except Exception as e:  # noqa: BLE001  (decode eagerly rather than not at all)
            job.error = f"{type(e).__name__}: {e}"
            say(f"the decode step did not compile ({job.error.splitlines()[0][:200]}); decoding eagerly")
            if mode is None:
                raise
        finally:
            job._load = None  # the closure holds the model: a finished job must not keep it alive
            job.loading.clear()
            job.done.set()
            if mode is not None:
                release_openmp_threads()  # this thread's idle team would slow the decoding threads

    job._load = compile_here
    if mode is None:
        compile_here()
    elif mode == "thread":
        threading.Thread(target=compile_here, args=(" in the background (decoding goes on meanwhile)",), daemon=True).start()
    else:
        estimate, cached = compile_estimate(model, batch)
        ticket = None
        if not cached:
            with _CHILD:
                ticket = _TICKETS[0]
                _TICKETS[0] += 1

        def build() -> str | None:
            """The child process's compile, in turn: one child at a time, in the order they were asked for (a server's
            smallest batch first). None when it worked, else why not."""
            with _CHILD:
                while _TICKETS[1] != ticket:
                    _CHILD.wait()
            try:
                if job.done.is_set():
                    return "cancelled"
                say(f"{_what(False)}, in a background process (decoding goes on meanwhile): ~{estimate:.0f} s (cache: {_cache_dir()})")
                started = time.monotonic()
                error = _build_in_child(model, batch, job)
                if error is None:
                    say(f"built by the background process in {time.monotonic() - started:.0f} s")
                return error
            finally:
                with _CHILD:
                    _TICKETS[1] += 1
                    _CHILD.notify_all()

        def watch() -> None:
            error = None if cached else build()
            if error is not None or job.done.is_set():
                if not job.done.is_set():
                    job.error, job._load = error, None
                    say(f"the decode step did not compile ({error}); decoding eagerly")
                    job.done.set()
                return
            job.built.set()
            if not hold:
                compile_here(" into this process")

        threading.Thread(target=watch, name=f"llmkit-compile-{batch}", daemon=True).start()
    return job


def _tick(stop: threading.Event, started: float, estimate: float, say, every: float = 20.0, cached: bool = False) -> None:
    """A line every `every` seconds while a compile (or a load from the cache) the user waits for runs."""
    while not stop.wait(every):
        spent = time.monotonic() - started
        of = f"of ~{estimate:.0f} s" if spent <= estimate else f"(longer than the ~{estimate:.0f} s expected: a busy machine)"
        say(f"still {'loading the compiled decode step' if cached else 'compiling the decode step'}: {spent:.0f} s {of}")


def _cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return str(cache_dir())


def _build_in_child(model: nn.Module, batch: int, job: CompileJob | None = None) -> str | None:
    """Compile the step of the model `model.decode_spec` names, for `batch` rows, in a child process at low priority
    (nice 10: the decoding here keeps the cores it needs) with this process's thread count (inductor's code depends on
    it). None when it worked, else the child's last error line."""
    import subprocess
    import sys

    spec = model.decode_spec
    cmd = [sys.executable, "-m", "llmkit.model.compiled", str(spec["model"]), "--batch", str(batch)]
    cmd += ["--threads", str(torch.get_num_threads()), "--quantize", str(spec.get("quantize") or "none"), "--dtype", spec["dtype"]]
    env = {**os.environ, "LLMKIT_COMPILE": "1"}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    except OSError as e:
        return f"the compile process did not start: {e}"
    with contextlib.suppress(OSError, AttributeError):  # nice 10 (no preexec_fn: it is unsafe in a threaded process)
        os.setpriority(os.PRIO_PROCESS, proc.pid, 10)
    _CHILDREN.add(proc)
    if job is not None:
        job.process = proc
    try:
        _, err = proc.communicate()
    finally:
        _CHILDREN.discard(proc)
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        return lines[-1][:300] if lines else f"the compile process exited with code {proc.returncode}"
    return None


_CHILDREN: set = set()  # compile processes running: stopped when this process exits (nothing is left behind)


@atexit.register
def _stop_children() -> None:
    for proc in list(_CHILDREN):
        proc.terminate()


def _current_job(model: nn.Module, batch: int) -> CompileJob | None:
    """The job of `model`'s step for `batch` rows, if it is still compiling or was compiled for the model as it is now
    (the guards on its modules are skipped: a changed model needs a new compile); else None."""
    entry = _COMPILED.get(model)
    job = entry.jobs.get(batch) if entry is not None else None
    if job is not None and (not job.done.is_set() or entry.structure == _structure(model)):
        return job
    return None


def _needs_fresh(entry: _Entry, model: nn.Module) -> bool:
    """A finished compile of another structure: its graphs assume a model that no longer exists."""
    return entry.structure is not None and entry.structure != _structure(model) and all(j.done.is_set() for j in entry.jobs.values())


class StaticDecoder:
    """A decoder's KV cache at a fixed size (batch, capacity) and its one-token step, compiled or not.

    `cache()` is a KVCache over the same buffers for the eager prefill; `step` decodes one token for every row.

        compile=False          the same step, eagerly (the reference the compiled one is tested against)
        compile=True           compile before the first step (or load the compiled step from inductor's cache)
        compile="background"   a background process compiles it (`compile_step`); step eagerly until it is ready
        compile="pays"         step eagerly; compile (then and there) only when the steps still to come save more time
                               than the compile costs, measured on the first eager steps (`steps`: how many there are);
                               a step already compiled for this model and batch size is used at once
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, *, compile: bool | str = True, steps: int | None = None, log=None):
        why = compilable(model)
        if why is not None:
            raise ValueError(f"the decode step of this model does not compile: {why}")
        if compile not in (True, False, "background", "pays"):
            raise ValueError(f"compile must be True, False, 'background' or 'pays', not {compile!r}")
        cfg = model.config
        p = next(model.parameters())
        self.model, self.batch, self.log = model, batch, log
        self.capacity = -(-capacity // WIDTH_STEP) * WIDTH_STEP
        # one spare block: the attended width stays below the buffers' length, so both stay symbolic sizes in the graph
        shape = (batch, cfg.n_kv_heads, self.capacity + WIDTH_STEP, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=_cache_dtype(model), device=p.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=_cache_dtype(model), device=p.device) for _ in range(cfg.n_layers)]
        self.mode, self.steps_left = compile, steps
        self.job: CompileJob | None = None
        self._eager_s: list[float] = []
        if compile is True:
            self.job = compile_step(model, batch, log=log)
        elif compile == "background":
            self.job = compile_step(model, batch, background="process", log=log)
        elif compile == "pays":
            job = _current_job(model, batch)  # compiled already, or compiling in the background (a chat's): used when ready
            if job is not None and not job.error:
                self.job = job if (job.ready.is_set() or not job.done.is_set()) else None

    @property
    def compiled(self) -> bool:
        """Whether the next step runs compiled."""
        return self.job is not None and self.job.ready.is_set()

    def cache(self) -> KVCache:
        """A KVCache over the static buffers, at column 0 (the eager prefill writes the prompt's columns)."""
        return KVCache.over(self.k, self.v, self.capacity)

    def _consider(self) -> None:
        """After a few eager steps: compile now if the steps left pay for it twice over (a compiled step is taken to be
        3x faster than an eager one; the estimate of the compile is this machine's record, else a guess)."""
        if self.mode != "pays" or self.job is not None or self.steps_left is None or len(self._eager_s) < 3:
            return
        eager = sorted(self._eager_s)[len(self._eager_s) // 2]
        estimate, _ = compile_estimate(self.model, self.batch)
        self.mode = False  # decided once
        if self.steps_left * eager * (1 - 1 / 3) > 2 * estimate:
            try:
                self.job = compile_step(self.model, self.batch, log=self.log)
            except Exception:  # noqa: BLE001  (reported through log; decode eagerly)
                self.job = None
        elif self.log is not None and self.model not in _TOLD_EAGER:  # once per model: fine-tuning's evaluation decodes often
            _TOLD_EAGER.add(self.model)
            self.log(
                f"note: decoding without compiling (a step takes {eager * 1000:.0f} ms): compiling the decode step takes "
                f"~{estimate:.0f} s and would not pay for the {self.steps_left} token{'s' if self.steps_left != 1 else ''} left "
                "(LLMKIT_COMPILE=always compiles anyway)"
            )

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int, valid: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one token per row: `tokens` (B,) at cache column `column` with positions (B,); `valid`
        (B, >= column + 1) marks the cached columns each row may see (its own, with the new one)."""
        if column >= self.capacity:
            raise ValueError(f"the static KV cache of {self.capacity} columns is full")
        if self.steps_left is not None:
            self.steps_left -= 1
        job = self.job
        if job is not None and job.built.is_set() and job.loading.is_set():
            job.done.wait()  # a built step loads in seconds; eager steps meanwhile would crawl (they share the interpreter)
        if self.compiled:
            return decode_step(self.model, self.k, self.v, tokens, positions, column, valid, step=self.job.step)  # type: ignore[union-attr]
        started = time.perf_counter()
        out = decode_step(self.model, self.k, self.v, tokens, positions, column, valid)
        if self.mode == "pays":
            self._eager_s.append(time.perf_counter() - started)
            self._consider()
        return out


def decode_step(model, ks, vs, tokens, positions, column: int, valid, *, step=None) -> torch.Tensor:
    """One token per row through cache buffers `ks`/`vs` (each (B, nkv, C, hd), C > the attended width; their length
    marked dynamic when compiled): the attended width is `column` + 1 rounded up to WIDTH_STEP (at most C - 1).
    `step`: a compiled step (`CompileJob.step`), else the same step runs eagerly."""
    width = min(ks[0].shape[2] - 1, (column // WIDTH_STEP + 1) * WIDTH_STEP)
    mask = torch.zeros(valid.shape[0], width, dtype=torch.bool, device=valid.device)  # fresh strides: no guard fails
    n = min(width, valid.shape[1])
    mask[:, :n] = valid[:, :n]
    col = torch.tensor([column], device=tokens.device)
    if step is None:
        return _step(model, ks, vs, tokens, positions, col, mask)
    import torch._dynamo as dynamo

    for t in (mask, *ks, *vs):  # one graph for every width and cache length (a cache marked once stays marked)
        dim = t.dim() - 1 if t is mask else 2
        if dim not in getattr(t, "_dynamo_dynamic_indices", ()):
            dynamo.mark_dynamic(t, dim)
    return step(model, ks, vs, tokens, positions, col, mask)


def compile_default() -> bool:
    """Whether generation compiles its decode step unless told: yes (where it pays), but LLMKIT_COMPILE=0 turns it off."""
    return os.environ.get("LLMKIT_COMPILE", "1") != "0"


def compile_mode() -> bool | str:
    """How `prepare_for_decoding` turns the compiled step on: "auto" (where it pays, the default), or True before the
    first step whatever it costs (LLMKIT_COMPILE=always: benchmarks and tests of the compiled path)."""
    return True if os.environ.get("LLMKIT_COMPILE", "1") == "always" else "auto"


def auto_quantization(model: nn.Module) -> str | None:
    """ "gguf" for float32 decoding on a CPU of weights loaded straight from a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks (the
    compiled step reads the blocks: the same weights in fewer bytes); None for everything else, fine-tuned copies of
    such weights included. int8 and int4 round the weights and are never chosen for the user."""
    p = next(model.parameters())
    decoder = model.config.family == "decoder"
    from_file = getattr(model, "gguf_blocks", None) is not None and getattr(model, "gguf_weights", None) is not None
    return "gguf" if p.dtype == torch.float32 and p.device.type == "cpu" and from_file and decoder else None


def prepare_for_decoding(model: nn.Module, quantize: str | None = "auto", compile: bool = True) -> nn.Module:
    """What `generate`, `chat` and `serve` do to a loaded model: quantize it as asked (`auto`: `auto_quantization`;
    None or "none": keep it), and on a CPU or a CUDA GPU (CUDA graphs there) turn on the compiled decode step, where it
    pays (`use_compiled_decode`),
    unless `compile` is False or LLMKIT_COMPILE=0 (a model whose step does not compile decodes eagerly). The GGUF
    blocks of `auto` serve only the compiled step: they are read when it first compiles."""
    from llmkit.model.quantize import quantize as quantize_model

    on = next(model.parameters()).device.type
    compiling = compile and compile_default() and on in ("cpu", "cuda") and model.config.family == "decoder"
    if getattr(model, "name_or_path", None) is not None:  # what a background compile process loads to build the same step
        p = next(model.parameters())
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(p.dtype, "fp32")
        model.decode_spec = {"model": model.name_or_path, "quantize": quantize, "dtype": dtype}
    method = auto_quantization(model) if quantize == "auto" else (None if quantize in (None, "none") else quantize)
    if method == "gguf" and quantize == "auto":
        model.pending_gguf_blocks = compiling  # without the compiled step the blocks would change nothing
    elif method:
        quantize_model(model, method)
    if compiling:
        use_compiled_decode(model, compile_mode())
    return model


def use_compiled_decode(model: nn.Module, on: bool | str = True) -> str | None:
    """Make `generate`, `stream` and chat decode `model` with the compiled step: True compiles before the first step,
    "auto" where it pays (`StaticDecoder(compile="pays")`), "eager" runs the same static step uncompiled, False the
    plain eager path. Returns why not when the model's step does not compile (it then decodes eagerly)."""
    why = compilable(model)
    model.compiled_decode = on if why is None else False
    return why


def main(argv: list[str] | None = None) -> None:
    """`python -m llmkit.model.compiled MODEL --batch N`: compile MODEL's decode step for N rows into inductor's cache on
    disk, as `generate`, `chat` and `serve` would prepare it (the background process of `compile_step`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m llmkit.model.compiled", description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantize", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    prepare_for_decoding(model, args.quantize, True)
    compile_step(model, args.batch)


if __name__ == "__main__":
    main()
