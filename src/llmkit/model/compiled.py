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

import os
import threading
import types
import weakref

import torch
from torch import nn

from llmkit.model.families import softcap
from llmkit.model.layers import KVCache

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
    if (cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        return "dynamic NTK RoPE (its frequencies depend on the length)"
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
    for i, block in enumerate(model.blocks):
        x, _ = block(x, bias=bias, rope=rope, cache=cache, layer=i)  # (B, 1, D)
    if model.norm is not None:
        x = model.norm(x)
    return softcap(model.lm_head(x)[:, 0], model.config.logit_softcap)  # (B, V)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its structure, its compiled step)
_COMPILING = threading.Lock()


def _structure(model: nn.Module) -> tuple:
    """What the compiled step of `model` assumes and, with the module guards skipped, no guard checks: its config,
    each module's type, plain attributes (training, LoRA's merged flag, scalings...) and hooks, and each weight's
    name, dtype, device and shape."""
    modules = tuple(
        (
            name,
            type(m),
            tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))))),
            tuple(len(h) for h in (m._forward_hooks, m._forward_pre_hooks)),
        )
        for name, m in model.named_modules()
    )
    tensors = tuple((n, t.dtype, t.device, tuple(t.shape)) for n, t in (*model.named_parameters(), *model.named_buffers()))
    return repr(model.config), modules, tensors


def _compiled_step(model: nn.Module, device: torch.device, *, refresh: bool = False):
    """The compiled `_step` of `model`: a copy of its own per model, compiled once; dynamo keeps a graph per batch
    size and dtype under it.

    Dynamo checks guards before every call; on the model's ~300 weights they cost 0.64 ms per token (SmolLM2). Since this copy
    only ever sees `model`, the guards on its modules are dropped (`skip_guard_on_all_nn_modules_unsafe`; the KV
    cache's, tokens' and mask's shapes and dtypes are still checked), and a change they would have caught — modules
    replaced, train mode, a LoRA merge, a cast, a new config — is caught here instead when `refresh` (a StaticDecoder's
    creation, the engine's warm-up): `_structure` differs, so a fresh copy compiles. On a CPU the compiled step calls
    its kernels from C++ (`cpp_wrapper`), not Python."""
    with _COMPILING:  # one model served under two names warms up from two threads: both get the same compiled step
        entry = _COMPILED.get(model)
        if entry is not None and not refresh:
            return entry[1]
        structure = _structure(model)
        if entry is not None and entry[0] == structure:
            return entry[1]
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        # a function of its own: dynamo keeps compiled code per code object, so models never share graphs or guards
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, "_step", _step.__defaults__, _step.__closure__)
        options: dict = {}
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        if skip_module_guards is not None:
            options["guard_filter_fn"] = skip_module_guards
        if device.type == "cpu":
            options["cpp_wrapper"] = True
        elif device.type == "cuda":
            options["triton.cudagraphs"] = True  # mode="reduce-overhead": CUDA graphs
        compiled = torch.compile(step, fullgraph=True, dynamic=False, options=options)
        _COMPILED[model] = (structure, compiled)
        return compiled


class StaticDecoder:
    """A decoder's KV cache at a fixed size (batch, capacity) and its compiled one-token step.

    `cache()` is a KVCache over the same buffers for the eager prefill; `step` decodes one token for every row.
    `compile=False` runs the same step eagerly (the reference the compiled one is tested against)."""

    def __init__(self, model: nn.Module, batch: int, capacity: int, *, compile: bool = True):
        why = compilable(model)
        if why is not None:
            raise ValueError(f"the decode step of this model does not compile: {why}")
        cfg = model.config
        p = next(model.parameters())
        dtype = p.dtype if p.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        self.model, self.batch = model, batch
        self.capacity = -(-capacity // WIDTH_STEP) * WIDTH_STEP
        # one spare block: the attended width stays below the buffers' length, so both stay symbolic sizes in the graph
        shape = (batch, cfg.n_kv_heads, self.capacity + WIDTH_STEP, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.compiled = compile
        if compile:
            _compiled_step(model, p.device, refresh=True)  # a fresh compile if the model changed since the last one
            self.warm_up()

    def warm_up(self) -> None:
        """Run the step once on column 0 (compiling it, or loading it from inductor's cache on disk) so that no
        timed token pays for it; the prefill overwrites the column."""
        device = self.k[0].device
        tokens = torch.zeros(self.batch, dtype=torch.long, device=device)
        valid = torch.zeros(self.batch, 1, dtype=torch.bool, device=device)
        valid[:, 0] = True
        with torch.no_grad():
            self.step(tokens, tokens.clone(), 0, valid)

    def cache(self) -> KVCache:
        """A KVCache over the static buffers, at column 0 (the eager prefill writes the prompt's columns)."""
        return KVCache.over(self.k, self.v, self.capacity)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int, valid: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one token per row: `tokens` (B,) at cache column `column` with positions (B,); `valid`
        (B, >= column + 1) marks the cached columns each row may see (its own, with the new one)."""
        if column >= self.capacity:
            raise ValueError(f"the static KV cache of {self.capacity} columns is full")
        return decode_step(self.model, self.k, self.v, tokens, positions, column, valid, compiled=self.compiled)


def decode_step(model, ks, vs, tokens, positions, column: int, valid, *, compiled: bool = True) -> torch.Tensor:
    """One token per row through cache buffers `ks`/`vs` (each (B, nkv, C, hd), C > the attended width; their length
    marked dynamic when compiled): the attended width is `column` + 1 rounded up to WIDTH_STEP (at most C - 1).
    Compiled, it uses the model's step as last set up (a StaticDecoder's creation notices a changed model; this does
    not look)."""
    width = min(ks[0].shape[2] - 1, (column // WIDTH_STEP + 1) * WIDTH_STEP)
    mask = torch.zeros(valid.shape[0], width, dtype=torch.bool, device=valid.device)  # fresh strides: no guard fails
    n = min(width, valid.shape[1])
    mask[:, :n] = valid[:, :n]
    col = torch.tensor([column], device=tokens.device)
    if not compiled:
        return _step(model, ks, vs, tokens, positions, col, mask)
    import torch._dynamo as dynamo

    for t in (mask, *ks, *vs):  # one graph for every width and cache length
        dynamo.mark_dynamic(t, t.dim() - 1 if t is mask else 2)
    return _compiled_step(model, tokens.device)(model, ks, vs, tokens, positions, col, mask)


def compile_default() -> bool:
    """Whether generation compiles its decode step unless told: yes, but LLMKIT_COMPILE=0 turns it off."""
    return os.environ.get("LLMKIT_COMPILE", "1") != "0"


def auto_quantization(model: nn.Module) -> str | None:
    """int4 for float32 decoding on a CPU of weights loaded straight from a Q4_1 GGUF (int4 finds the file's own codes
    again, its scales rounded to bf16: perplexity within 0.1 of the float weights, benchmarks/RESULTS.md); None for
    everything else, fine-tuned copies of such weights included (their quality is kept as it is)."""
    p = next(model.parameters())
    decoder = model.config.family == "decoder"
    return (
        "int4"
        if p.dtype == torch.float32 and p.device.type == "cpu" and getattr(model, "gguf_weights", None) == "Q4_1" and decoder
        else None
    )


def prepare_for_decoding(model: nn.Module, quantize: str | None = "auto", compile: bool = True) -> nn.Module:
    """What `generate`, `chat` and `serve` do to a loaded model: quantize it as asked (`auto`: `auto_quantization`;
    None or "none": keep it), and on a CPU turn on the compiled decode step unless `compile` is False or
    LLMKIT_COMPILE=0 (a model whose step does not compile decodes eagerly)."""
    from llmkit.model.quantize import quantize as quantize_model

    method = auto_quantization(model) if quantize == "auto" else (None if quantize in (None, "none") else quantize)
    if method:
        quantize_model(model, method)
    if compile and compile_default() and next(model.parameters()).device.type == "cpu" and model.config.family == "decoder":
        use_compiled_decode(model)
    return model


def use_compiled_decode(model: nn.Module, on: bool = True) -> str | None:
    """Make `generate`, `stream` and chat decode `model` with the compiled step (on=False: eagerly again). Returns why
    not when the model's step does not compile (it then decodes eagerly)."""
    why = compilable(model)
    model.compiled_decode = on and why is None
    return why
