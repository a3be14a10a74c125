"""The layers of the Transformer, in the order of the diagram (Vaswani et al. 2017, fig. 1):

    token embedding ─► positional encoding ─► [ attention ─► add & norm ─► feed-forward ─► add & norm ] × N

Positional encodings: sinusoidal (the paper's, added to the embeddings), learned absolute (GPT-2, BERT),
rotary (RoPE, Su et al. 2021: rotates q and k), and T5's bucketed relative bias (Raffel et al. 2020, added to
the attention scores). Attention is multi-head or grouped-query (Ainslie et al. 2023), computed by
`torch.nn.functional.scaled_dot_product_attention`, with a slow path that returns the attention weights.

Attention masks are additive (0 = attend, a very negative number = do not), built by `attention_bias`:

    causal (decoder)      padding (key 3 is pad)   cross (decoder -> encoder)
      k0 k1 k2 k3           k0 k1 k2 k3              every decoder query sees every
    q0 ■  ·  ·  ·         q0 ■  ■  ■  ·              non-padded encoder position
    q1 ■  ■  ·  ·         q1 ■  ■  ■  ·
    q2 ■  ■  ■  ·         q2 ■  ■  ■  ·
    q3 ■  ■  ■  ■         q3 ■  ■  ■  ·
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model.config import ModelConfig

_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_GQA = _TORCH >= (2, 5)  # scaled_dot_product_attention(enable_gqa=) arrived in torch 2.5
_FUSED_RMS_NORM = hasattr(F, "rms_norm")

# --- normalization -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight (Zhang & Sennrich 2019), computed in float32 as Llama and T5 do; with half
    weights the output is in their dtype (T5's rule: its float32 feed-forward output returns to float16 here).
    `offset` 1 is Gemma's form, x / rms · (1 + weight), the gain computed in float32 and the result cast back to x's
    dtype as Gemma does (a weight of zeros is the identity)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.weight if not self.offset else self.weight.float() + self.offset
        if _FUSED_RMS_NORM and x.dtype == torch.float32 == gain.dtype:  # one kernel instead of six ops (decoding is op-bound)
            return F.rms_norm(x, (x.shape[-1],), gain, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * gain).to(x.dtype)
        return self.weight * h.to(self.weight.dtype if self.weight.dtype in (torch.float16, torch.bfloat16) else x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# --- positional encodings --------------------------------------------------------------------------------


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))  -> (n_positions, dim)"""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class AbsolutePosition(nn.Module):
    """Learned (GPT-2, BERT) or fixed sinusoidal position vectors, added to the token embeddings.
    The sinusoidal table stays float32 whatever dtype the model is cast to (a bf16 table is off by 0.03 at 1,000)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.learned = cfg.position == "learned"
        self.n, self.dim = cfg.max_seq_len, cfg.d_model
        if self.learned:
            self.weight = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.d_model))
        else:
            self.register_buffer("weight", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)

    def init_buffers(self) -> None:
        if not self.learned:
            self.weight = sinusoidal_table(self.n, self.dim).to(self.weight.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.learned and self.weight.dtype != torch.float32 and not self.weight.is_meta:
            self.init_buffers()  # recomputed exactly, on the new device
        return self

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)  # (..., T, D)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (hd/2,) float32, cos/sin scale) of RoPE, with transformers' scalings for longer contexts:

    linear        every frequency / factor (position interpolation, Chen et al. 2023)
    dynamic       NTK-aware: the base grows with the length beyond the original context (computed per call)
    llama3        low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1)
    yarn          per-frequency ramp between interpolation and extrapolation, cos/sin scaled (Peng et al. 2023)
    longrope      per-frequency divisors, `short_factor` up to the original context and `long_factor` beyond it (chosen
                  per call by the length, as `dynamic`), cos/sin scaled by sqrt(1 + ln(factor) / ln(original)) (Phi-3)
    freq_factors  llama.cpp's `rope_freqs` tensor: frequency i / factors[i]

    `head_dim` is the number of rotating features (a partial rotary's `rotary_dim`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (hd/2,)
    inv = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "freq_factors":
        return inv / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if kind == "longrope":
        original = scaling["original_max_position_embeddings"]
        factor = float(scaling.get("factor") or 1.0)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = scaling["long_factor"] if seq_len is not None and seq_len > original else scaling["short_factor"]
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta**exponents), float(attention)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        if seq_len is None or seq_len <= original:
            return inv, 1.0
        base = theta * ((factor * torch.tensor(float(seq_len)) / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)  # long wavelengths: interpolate
        smooth = (original / wavelen - low) / (high - low)
        mixed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, mixed, scaled), 1.0
    # yarn
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (high ones), 0: interpolate it (low ones)
    pos_freqs = theta**exponents
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attention_factor)


class Rotary(nn.Module):
    """RoPE: rotate pairs of q/k features by position-dependent angles (the `rotate_half` layout of Llama).

    `inv_freq` is computed in float32 and stays float32 when the model is cast to bf16/fp16 (at position 3,000 a bf16
    inv_freq moves SmolLM2's logits by 0.4)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.dynamic = (scaling or {}).get("rope_type") in ("dynamic", "longrope")  # the frequencies follow the length
        inv, self.attention_scaling = rope_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def init_buffers(self) -> None:
        self.inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling)[0].to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.init_buffers()
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:  # NTK, LongRoPE: the frequencies depend on the longest position of this call
            seq_len = int(positions.max()) + 1
            if seq_len > self.scaling["original_max_position_embeddings"]:
                inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling, seq_len)[0].to(inv_freq.device)
        freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
        if self.attention_scaling != 1.0:
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (T, r) or (B, T, r), r = the rotating features (r < hd: partial RoPE, the first r
    features rotate and the rest pass through, as Phi-4-mini)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, r)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RelativePositionBias(nn.Module):
    """T5's relative attention bias: one learned scalar per (bucket, head), buckets exact for near distances
    and logarithmic up to `max_distance`; bidirectional in the encoder, looking back only in the decoder."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        n_buckets, out = self.n_buckets, torch.zeros_like(relative)
        if self.bidirectional:
            n_buckets //= 2
            out = out + (relative > 0).long() * n_buckets
            distance = relative.abs()
        else:
            distance = -torch.clamp(relative, max=0)
        exact = n_buckets // 2
        log_bucket = (
            exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact) * (n_buckets - exact)).long()
        )
        log_bucket = torch.clamp(log_bucket, max=n_buckets - 1)
        return out + torch.where(distance < exact, distance, log_bucket)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        q_pos = torch.arange(offset, offset + q_len, device=self.embedding.weight.device)[:, None]
        k_pos = torch.arange(k_len, device=self.embedding.weight.device)[None, :]
        values = self.embedding(self.bucket(k_pos - q_pos))  # (Tq, Tk, nh)
        return values.permute(2, 0, 1)[None]  # (1, nh, Tq, Tk)


# --- masks -----------------------------------------------------------------------------------------------


def attention_bias(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding: torch.Tensor | None = None,
    offset: int = 0,
    position_bias: torch.Tensor | None = None,
    window: int | None = None,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor | None:
    """Additive mask (B|1, nh|1, Tq, Tk), or None when every query may see every key.

    `key_padding` is (B, Tk) with 1 for real tokens and 0 for padding, or (B, Tq, Tk) with 1 where query i may see
    key j (packed rows: each example sees only itself, block by block); `offset` is the position of the first query
    (keys before it come from a KV cache); `window` (causal only): query i sees keys i - window < j <= i, the sliding
    window of Mistral and Gemma's local layers (a key's column distance is its position distance: every row's tokens
    sit in contiguous columns, padding before them).
    """
    allowed = None
    if causal:
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_padding is not None:
        pad = key_padding[:, None].bool() if key_padding.dim() == 3 else key_padding[:, None, None, :].bool()  # (B, 1, Tq|1, Tk)
        allowed = pad if allowed is None else allowed & pad
    if allowed is None:
        return position_bias.to(dtype) if position_bias is not None else None
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return bias


# --- KV cache --------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, preallocated to `max_len`: (B, n_kv_heads, max_len, head_dim) each.

    Decoding writes each new step in place (no re-allocation per token); `pos` is the number of cached positions.
    An encoder-decoder also keeps each layer's cross-attention keys and values (`cross`), computed once from the
    encoder's output. Beam search reorders the rows with `reorder`.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype=torch.float32, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.max_len, self.pos = max_len, 0

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor], max_len: int, pos: int = 0) -> KVCache:
        """A KVCache over buffers someone else owns (a static cache, the serving engine's rows): no copy."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.cross = k, v, [None] * len(k)
        cache.max_len, cache.pos = max_len, pos
        return cache

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, batch: int, max_len: int | None = None, *, n_layers: int | None = None, dtype=torch.float32, device=None
    ):
        return cls(n_layers or cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({self.pos} + {T})")
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        return self.k[layer][:, :, : self.pos + T], self.v[layer][:, :, : self.pos + T]  # (B, nkv, pos+T, hd)

    def advance(self, n: int) -> None:
        self.pos += n

    def reorder(self, rows: torch.Tensor, cross: bool = True) -> None:
        """Keep row rows[i] as row i (beam search: each surviving beam takes its parent's cache). `cross=False` leaves
        the cross-attention keys and values alone (rows that share one encoder output)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, rows)
            self.v[i] = self.v[i].index_select(0, rows)
            if cross and self.cross[i] is not None:
                self.cross[i] = tuple(t.index_select(0, rows) for t in self.cross[i])

    def reset(self) -> None:
        self.pos = 0
        self.cross = [None] * len(self.k)


# --- attention -------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head (n_kv_heads == n_heads) or grouped-query attention; self- or cross-attention."""

    qkv_proj: nn.Module | None

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.self_attention = not cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        self.dropout = cfg.dropout
        inner, kv_inner = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias  # Qwen2: biases on q, k, v only
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_inner, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_inner, bias=qkv_bias)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        # q, k and v in one matrix (`quantize.fuse_projections`, GGUF blocks; for inference), registered as a module slot
        # from the start: its later assignment is then one step, safe while another thread runs an eager forward
        self.register_module("qkv_proj", None)
        # QK-norm: each head's queries and keys RMS-normalized (a learned gain per channel) before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.softcap = cfg.attn_softcap  # Gemma 2: scores = cap · tanh(scores / cap) before the mask

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's q (B, nh, T, hd), k and v (B, nkv, T, hd), before positions."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        if context is None:
            q, k, v = self.project(x)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
            q = (self.q_norm(q) if self.q_norm is not None else q).transpose(1, 2)  # (B, nh, T, hd)
        if context is not None and cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]  # cross-attention: the encoder's keys and values, projected once
        else:
            if context is not None:
                S = context.shape[1]
                k = self.k_proj(context).view(B, S, self.n_kv_heads, self.head_dim)
                k = (self.k_norm(k) if self.k_norm is not None else k).transpose(1, 2)  # (B, nkv, S, hd)
                v = self.v_proj(context).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
            if rope is not None:
                k = apply_rope(k, *rope)
            if cache is not None and context is None:
                k, v = cache.update(layer, k, v)  # (B, nkv, pos+T, hd)
            elif cache is not None:
                cache.cross[layer] = (k, v)
        if rope is not None:
            q = apply_rope(q, *rope)
        # each group of n_heads/n_kv_heads query heads shares one k/v head: SDPA can do that itself, else repeat them
        slow = need_weights or self.softcap is not None  # SDPA neither returns the weights nor caps the scores
        share_kv = self.n_kv_heads != self.n_heads and _SDPA_GQA and not slow
        if self.n_kv_heads != self.n_heads and not share_kv:
            rep = self.n_heads // self.n_kv_heads
            k = k[:, :, None].expand(B, self.n_kv_heads, rep, *k.shape[2:]).reshape(B, self.n_heads, *k.shape[2:])  # (B, nh, S, hd)
            v = v[:, :, None].expand(B, self.n_kv_heads, rep, *v.shape[2:]).reshape(B, self.n_heads, *v.shape[2:])
        weights = None
        if slow:  # the same math written out, with the attention weights kept
            scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, nh, T, S)
            if self.softcap is not None:
                scores = self.softcap * torch.tanh(scores / self.softcap)
            if bias is not None:
                scores = scores + bias.float()
            elif is_causal:
                scores = scores.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            if self.training and self.dropout:
                weights = F.dropout(weights, self.dropout)
            y = (weights @ v.float()).to(q.dtype)  # (B, nh, T, hd)
            weights = weights if need_weights else None
        elif T == 1 and bias is not None and hasattr(cache, "attend"):  # the compiled decode step's own attention
            y = cache.attend(q, k, v, bias, self.scale)  # type: ignore[union-attr]
        else:
            extra = {"enable_gqa": True} if share_kv else {}
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if bias is None else bias.to(q.dtype),
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and bias is None,
                scale=self.scale,
                **extra,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y), weights


# --- feed-forward ----------------------------------------------------------------------------------------

ACTIVATIONS = {
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # Primer (So et al. 2021); modded-nanogpt's MLP
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) for the gated kinds (SwiGLU, GEGLU; Shazeer 2020)."""

    gate_up_proj: nn.Module | None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.float32_down = False  # T5 in float16 keeps its down projection (`wo`) in float32, as transformers does
        self.register_module("gate_up_proj", None)  # gate and up in one matrix (as qkv_proj: a module slot from the start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            h = self.act(gate) * up
        elif self.gate_proj is not None:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h.float() if self.float32_down else h)


# --- the block -------------------------------------------------------------------------------------------


class Block(nn.Module):
    """One layer: self-attention, (cross-attention), feed-forward, each wrapped in a residual and a norm.

    pre-norm (GPT-2, Llama, T5):   x = x + f(norm(x))
    sandwich (Gemma 2 and 3):      x = x + norm'(f(norm(x)))
    post-norm (Vaswani, BERT):     x = norm(x + f(x))
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.fp16_clamp = cfg.fp16_clamp
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_norm, self.cross_attn = (make_norm(cfg), Attention(cfg, cross=True)) if cross else (None, None)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.attn_post_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.mlp_post_norm = make_norm(cfg) if cfg.sandwich_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x, norm, fn, post=None):
        if self.pre:
            out, w = fn(norm(x))
            x = x + self.drop(out if post is None else post(out))
        else:
            out, w = fn(x)
            x = norm(x + self.drop(out))
        if self.fp16_clamp and x.dtype == torch.float16:  # T5 overflows float16; transformers clamps here (no host sync)
            limit = torch.finfo(torch.float16).max
            bound = torch.where(torch.isinf(x).any(), limit - 1000, limit).to(x.dtype)
            x = x.clamp(-bound, bound)
        return x, w

    def forward(
        self, x, *, bias=None, is_causal=False, rope=None, cache=None, layer=0, context=None, context_bias=None, need_weights=False
    ):
        x, w = self._residual(
            x,
            self.attn_norm,
            lambda h: self.attn(h, bias=bias, is_causal=is_causal, rope=rope, cache=cache, layer=layer, need_weights=need_weights),
            self.attn_post_norm,
        )
        if self.cross_attn is not None:
            x, _ = self._residual(
                x, self.cross_norm, lambda h: self.cross_attn(h, context=context, bias=context_bias, cache=cache, layer=layer)
            )
        x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None), self.mlp_post_norm)
        return x, w


def pad_right(rows: list[list[int]], value: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids as one right-padded batch: (ids filled with `value`, mask of the real tokens), each (B, T) long, on
    `device` (built in host memory, then copied once). The one padding collate: fine-tuning's, the classifier's, the
    embedders' and lm-eval's batches go through it."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(rows), width, dtype=torch.long, device="cpu")
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.as_tensor(row, dtype=torch.long, device="cpu")
        mask[r, : len(row)] = 1
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)


POOLINGS = ("mean", "cls", "last", "max")


def pool(states: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per sequence (B, D) from hidden states (B, T, D) and a right-padded mask (B, T) of real tokens:

    mean   the mean over the real tokens (sentence-transformers' default for encoders)
    cls    the first token's state (BERT's [CLS])
    last   the last real token's state (a decoder's: it has seen the whole text)
    max    the element-wise maximum over the real tokens
    """
    m = (mask if mask is not None else torch.ones(states.shape[:2], device=states.device)).to(states.device)
    if pooling == "mean":
        w = m.to(states.dtype)[..., None]  # (B, T, 1)
        return (states * w).sum(1) / w.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return states[:, 0]
    if pooling == "max":
        return states.masked_fill(m[..., None] == 0, float("-inf")).amax(1)
    if pooling == "last":
        return states[torch.arange(states.shape[0], device=states.device), m.sum(1).long() - 1]
    raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
