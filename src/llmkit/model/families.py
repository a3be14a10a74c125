"""The three model families, each a thin assembly of the layers in `layers.py`.

Decoder          (GPT-2, Llama)  ids ─► embed ─► N × Block(causal) ─► norm ─► LM head ─► next-token logits
Encoder          (BERT)          ids ─► embed ─► N × Block(bidirectional) ─► MLM head | hidden states
EncoderDecoder   (T5, Vaswani)   source ─► encoder ─┐
                                 target ─► embed ─► N × Block(causal + cross-attention) ─► LM head
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig
from llmkit.model.layers import (
    ACTIVATIONS,
    AbsolutePosition,
    Block,
    KVCache,
    RelativePositionBias,
    Rotary,
    attention_bias,
    make_norm,
    pool,
)
from llmkit.tokenizer.core import Tokenizer


class Embedding(nn.Module):
    """Token embedding (× sqrt(d) for Vaswani) + absolute position (+ token type) (+ norm for BERT)."""

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokens = tokens if tokens is not None else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = AbsolutePosition(cfg) if cfg.position in ("learned", "sinusoidal") else None
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None, check: bool = True
    ) -> torch.Tensor:
        if check:
            check_ids(ids, self.cfg.vocab_size)
        x = self.tokens(ids)  # (B, T, D)
        if self.cfg.scale_embeddings:  # the factor rounded to the weights' dtype first, as Gemma does (exact in float32)
            x = x * torch.tensor(math.sqrt(self.cfg.d_model), dtype=x.dtype, device=x.device)
        if self.position is not None:
            x = x + self.position(positions).to(x.dtype)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(ids))
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


def check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside [0, vocab_size), naming the first offending one (one host sync: call it once per input,
    not per decoding step)."""
    if not ids.numel() or torch.compiler.is_compiling():  # a compiled step's ids were checked when its data was built;
        return  # reading a tensor's value would break the graph (dynamo's "Graph break from Tensor.item()" warning)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        first = int(ids[bad][0])
        raise LlmkitError(
            f"token id {first} is outside the model's vocabulary of {vocab_size} (ids must be 0..{vocab_size - 1})",
            "use the tokenizer that belongs to this model",
        )


def _check_length(cfg: ModelConfig, length: int) -> None:  # relative positions have no limit
    if cfg.position in ("learned", "sinusoidal", "rope") and length > cfg.max_seq_len:
        raise LlmkitError(
            f"the input is {length} tokens, longer than the model's context of {cfg.max_seq_len}",
            f"shorten or truncate it to {cfg.max_seq_len} tokens",
        )


def _init_weights(model: nn.Module, cfg: ModelConfig, n_residual_layers: int) -> None:
    """N(0, 0.02) for weights, zero biases; residual output projections scaled by 1/sqrt(2L) (GPT-2), or zero with
    `zero_init` (modded-nanogpt: each block starts as the identity)."""
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device for loading: the weights come from a file
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
            if residual_out and cfg.zero_init:
                nn.init.zeros_(p)
                continue
            std = 0.02 / math.sqrt(2 * n_residual_layers) if residual_out else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap): logits bounded to (-cap, cap), near-identity for small ones (Gemma 2)."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _rotary(cfg: ModelConfig) -> Rotary | None:
    return Rotary(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if cfg.position == "rope" else None


def _rotary_local(cfg: ModelConfig) -> Rotary | None:
    """The windowed layers' own RoPE (Gemma 3: base 10,000 and no scaling, where the global layers use 1,000,000)."""
    if cfg.position != "rope" or cfg.rope_local_theta is None or cfg.sliding_window is None:
        return None
    return Rotary(cfg.rotary_dim or cfg.head_dim, cfg.rope_local_theta)


def _relative(cfg: ModelConfig, bidirectional: bool) -> RelativePositionBias | None:
    return RelativePositionBias(cfg, bidirectional) if cfg.position == "relative" else None


class LanguageModel(nn.Module):
    """What every family is, and what `llmkit.load` returns: a module with its `config` and the `tokenizer` that loading
    attaches (None for a model built from a config alone). Functions that take a model take this."""

    config: ModelConfig
    tokenizer: Tokenizer | None = None
    checkpointing: bool = False  # activation checkpointing: training keeps each block's input only, recomputes the rest

    def run_block(self, block: nn.Module, x: torch.Tensor, **kwargs):
        """`block(x, **kwargs)`; while training with `checkpointing`, through `torch.utils.checkpoint`: the block's
        activations are recomputed in the backward pass instead of kept (memory for time, as Hugging Face's
        `gradient_checkpointing_enable`). Decoding with a cache never checkpoints."""
        if self.checkpointing and self.training and torch.is_grad_enabled() and kwargs.get("cache") is None:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)


class Decoder(LanguageModel):
    """Decoder-only language model: `forward(ids (B, T)) -> logits (B, T, V)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg)
        self.rotary = _rotary(cfg)
        self.rotary_local = _rotary_local(cfg)
        self.rel_bias = _relative(cfg, bidirectional=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        _init_weights(self, cfg, cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight

    def layer_inputs(self, i: int, bias, rope, local_bias, local_rope) -> tuple:
        """(mask, RoPE) of layer i: a windowed layer's own (sliding window, Gemma 3's local RoPE), else the global ones."""
        return (local_bias, local_rope) if self.config.windowed(i) else (bias, rope)

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.embed.tokens.weight
        return KVCache.for_model(self.config, batch, max_len, dtype=dtype or p.dtype, device=p.device)

    def hidden_states(
        self, ids, attention_mask=None, cache: KVCache | None = None, position_ids=None, need_weights=False, check_ids: bool = True
    ):
        B, T = ids.shape  # (B, T)
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            _check_length(self.config, start + T)
            position_ids = torch.arange(start, start + T, device=ids.device)  # (T,)
        else:  # the caller's positions (a served batch's rows each have their own; its shared cache may be wider)
            _check_length(self.config, T)
        x = self.embed(ids, position_ids, check=check_ids)  # (B, T, D)
        rope = self.rotary(position_ids) if self.rotary is not None else None
        rel = self.rel_bias(T, start + T, offset=start) if self.rel_bias is not None else None  # (1, nh, T, start+T)
        plain = attention_mask is None and start == 0 and rel is None  # a fresh causal pass: SDPA's is_causal, no mask tensor
        one_step = attention_mask is None and T == 1 and rel is None  # one new token sees every cached one: no mask at all
        bias = (
            None
            if plain or one_step
            else attention_bias(
                T, start + T, causal=True, key_padding=attention_mask, offset=start, position_bias=rel, dtype=x.dtype, device=ids.device
            )
        )
        window = self.config.sliding_window
        masked = window is not None and start + T > window  # the window hides some keys (shorter inputs: as global)
        local_bias = (
            attention_bias(
                T,
                start + T,
                causal=True,
                key_padding=attention_mask,
                offset=start,
                position_bias=rel,
                window=window,
                dtype=x.dtype,
                device=ids.device,
            )
            if masked
            else bias
        )
        local_rope = self.rotary_local(position_ids) if self.rotary_local is not None else rope
        maps = []
        for i, block in enumerate(self.blocks):
            b, r = self.layer_inputs(i, bias, rope, local_bias, local_rope)
            causal = plain and b is None
            x, w = self.run_block(block, x, bias=b, is_causal=causal, rope=r, cache=cache, layer=i, need_weights=need_weights)
            maps.append(w)
        if cache is not None:
            cache.advance(T)
        if self.norm is not None:
            x = self.norm(x)
        return x, maps

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (`last_only`: a prefill needs no more).
        `attention_mask` (B, cached + T) marks real tokens with 1; `cache` continues a decode; `check_ids=False` skips
        the vocabulary check (a host sync) for ids the caller already checked."""
        x, _ = self.hidden_states(ids, attention_mask, cache, position_ids, check_ids=check_ids)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        return softcap(self.lm_head(x), self.config.logit_softcap)  # (B, T, V)

    def attention_maps(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every layer, each (B, n_heads, T, T) (the slow path)."""
        return self.hidden_states(ids, need_weights=True)[1]


class Encoder(LanguageModel):
    """Bidirectional encoder: `forward(ids)` -> masked-LM logits (B, T, V), or hidden states (B, T, D) without a head.

    Also `embed_sentences` (mean / CLS pooling) and `classify` (a sequence-classification head when num_labels > 0).
    """

    def __init__(self, cfg: ModelConfig, mlm_head: bool = True):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg)
        self.rotary = _rotary(cfg)
        self.rel_bias = _relative(cfg, bidirectional=True)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.mlm_transform = None
        self.lm_head = None
        if mlm_head:
            if cfg.mlm_transform:
                self.mlm_transform = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), _Activation(cfg.activation), make_norm(cfg))
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.pooler = self.classifier = None
        if cfg.num_labels:
            self.pooler = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.Tanh())
            self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.d_model, cfg.num_labels))
        _init_weights(self, cfg, cfg.n_layers)
        if self.lm_head is not None and cfg.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight

    def hidden_states(self, ids, attention_mask=None, token_type_ids=None, need_weights=False):
        B, T = ids.shape
        _check_length(self.config, T)
        positions = torch.arange(T, device=ids.device)
        x = self.embed(ids, positions, token_type_ids)  # (B, T, D)
        rope = self.rotary(positions) if self.rotary is not None else None
        rel = self.rel_bias(T, T) if self.rel_bias is not None else None
        bias = attention_bias(T, T, causal=False, key_padding=attention_mask, position_bias=rel, dtype=x.dtype, device=ids.device)
        maps = []
        for block in self.blocks:
            x, w = self.run_block(block, x, bias=bias, rope=rope, need_weights=need_weights)
            maps.append(w)
        if self.norm is not None:
            x = self.norm(x)
        return x, maps

    def forward(self, ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x, _ = self.hidden_states(ids, attention_mask, token_type_ids)
        if self.lm_head is None:
            return x  # (B, T, D)
        if self.mlm_transform is not None:
            x = self.mlm_transform(x)
        return softcap(self.lm_head(x), self.config.logit_softcap)  # (B, T, V)

    def embed_sentences(self, ids, attention_mask=None, pooling: str = "mean", normalize: bool = True, token_type_ids=None) -> torch.Tensor:
        """One vector per sequence (B, D): the mean of the real tokens' states, or the first ([CLS]) token's."""
        if pooling not in ("mean", "cls"):
            raise LlmkitError(f"unknown pooling {pooling!r}", "use 'mean' or 'cls'")
        x, _ = self.hidden_states(ids, attention_mask, token_type_ids)
        out = pool(x, attention_mask, pooling)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def classify(self, ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Class logits (B, num_labels) from the first token's state."""
        if self.classifier is None:
            raise LlmkitError("this encoder has no classification head", "build it with num_labels > 0")
        x, _ = self.hidden_states(ids, attention_mask, token_type_ids)
        return self.classifier(self.pooler(x[:, 0]))

    def attention_maps(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return self.hidden_states(ids, need_weights=True)[1]


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)


class EncoderDecoder(LanguageModel):
    """Encoder-decoder: `forward(ids, decoder_ids) -> logits (B, T_dec, V)`. Embeddings are shared."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.enc_embed, self.dec_embed = Embedding(cfg, shared), Embedding(cfg, shared)
        self.enc_bias = _relative(cfg, bidirectional=True)
        self.dec_bias = _relative(cfg, bidirectional=False)
        self.rotary = _rotary(cfg)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_decoder_layers))
        pre = cfg.norm_position == "pre"
        self.enc_norm, self.dec_norm = (make_norm(cfg), make_norm(cfg)) if pre else (None, None)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        _init_weights(self, cfg, cfg.n_layers + cfg.n_decoder_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = shared.weight

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.enc_embed.tokens.weight
        return KVCache.for_model(
            self.config, batch, max_len, n_layers=self.config.n_decoder_layers, dtype=dtype or p.dtype, device=p.device
        )

    def encode(self, ids, attention_mask=None, need_weights=False):
        B, T = ids.shape
        _check_length(self.config, T)
        positions = torch.arange(T, device=ids.device)
        x = self.enc_embed(ids, positions)  # (B, T, D)
        rel = self.enc_bias(T, T) if self.enc_bias is not None else None
        bias = attention_bias(T, T, causal=False, key_padding=attention_mask, position_bias=rel, dtype=x.dtype, device=ids.device)
        rope = self.rotary(positions) if self.rotary is not None else None
        maps = []
        for block in self.encoder:
            x, w = self.run_block(block, x, bias=bias, rope=rope, need_weights=need_weights)
            maps.append(w)
        return (self.enc_norm(x) if self.enc_norm is not None else x), maps

    def decode(
        self, decoder_ids, encoder_out, attention_mask=None, cache: KVCache | None = None, need_weights=False, check_ids: bool = True
    ):
        """Logits (B, T_dec, V) of the decoder given the encoder's output (B, T_enc, D). With a cache, the cross-attention
        keys and values are computed from `encoder_out` at the first call and reused after."""
        B, T = decoder_ids.shape
        start = cache.pos if cache is not None else 0
        _check_length(self.config, start + T)
        positions = torch.arange(start, start + T, device=decoder_ids.device)
        x = self.dec_embed(decoder_ids, positions, check=check_ids)  # (B, T, D)
        rel = self.dec_bias(T, start + T, offset=start) if self.dec_bias is not None else None
        bias = attention_bias(T, start + T, causal=True, offset=start, position_bias=rel, dtype=x.dtype, device=x.device)
        context_bias = attention_bias(T, encoder_out.shape[1], causal=False, key_padding=attention_mask, dtype=x.dtype, device=x.device)
        rope = self.rotary(positions) if self.rotary is not None else None
        maps = []
        for i, block in enumerate(self.decoder):
            x, w = self.run_block(
                block,
                x,
                bias=bias,
                rope=rope,
                cache=cache,
                layer=i,
                context=encoder_out,
                context_bias=context_bias,
                need_weights=need_weights,
            )
            maps.append(w)
        if cache is not None:
            cache.advance(T)
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        return softcap(self.lm_head(x), self.config.logit_softcap), maps

    def forward(self, ids, decoder_ids, attention_mask=None, cache: KVCache | None = None, encoder_out=None) -> torch.Tensor:
        if encoder_out is None:
            encoder_out, _ = self.encode(ids, attention_mask)
        return self.decode(decoder_ids, encoder_out, attention_mask, cache)[0]

    def attention_maps(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Encoder self-attention weights of every layer, each (B, n_heads, T, T)."""
        return self.encode(ids, need_weights=True)[1]
