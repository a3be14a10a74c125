"""One config for every model, and the named presets as data.

A preset is a dict of overrides on `ModelConfig`'s defaults; nothing about an architecture lives in a
subclass. `flops_per_token` and `param_count` derive from the config alone (`llmkit model info PRESET`).

    family            decoder (GPT/Llama) | encoder (BERT) | encoder-decoder (T5, the original Transformer)
    position          sinusoidal | learned | rope | relative (T5's bucketed bias), in every family
    rope_scaling      None | {"rope_type": linear | dynamic | llama3 | yarn | longrope | freq_factors, ...} (as transformers)
    activation        relu | relu2 (ReLU², Primer) | gelu | gelu_tanh | swiglu | geglu
    norm              layernorm | rmsnorm, at norm_position pre | post; norm_offset 1: RMSNorm's gain is 1 + weight (Gemma)
    sandwich_norm     a norm on each sublayer's output too, before the residual add (Gemma 2 and 3)
    qk_norm           RMS-normalize each head's queries and keys before attention (Dehghani et al. 2023; modded-nanogpt)
    logit_softcap     logits = cap · tanh(logits / cap) (Gemma 2; modded-nanogpt); attn_softcap the same on attention scores
    sliding_window    windowed layers attend to the last `sliding_window` positions only (Mistral; Gemma's local
                      layers); layer_types says which layers ("sliding_attention" | "full_attention"), None: all of them;
                      rope_local_theta: the windowed layers' RoPE base where it differs (Gemma 3)
    rotary_dim        partial RoPE: only each head's first rotary_dim features rotate (Phi-4-mini)
    zero_init         attention and feed-forward output projections start at zero: each block starts as the identity
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from llmkit.errors import LlmkitError

FAMILIES = ("decoder", "encoder", "encoder-decoder")


@dataclass
class ModelConfig:
    family: str = "decoder"
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # default 4 * d_model
    n_decoder_layers: int | None = None  # encoder-decoder: default n_layers
    max_seq_len: int = 512
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # longer contexts: {"rope_type": "llama3", "factor": 8.0, ...}; see ROPE_SCALINGS
    relative_buckets: int = 32
    relative_max_distance: int = 128
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    qk_norm: bool = False
    logit_softcap: float | None = None
    attn_softcap: float | None = None  # Gemma 2: attention scores = cap · tanh(scores / cap)
    norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (offset + weight)
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and after the feed-forward as well as before
    sliding_window: int | None = None  # windowed layers see this many positions, their own included
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"; None: all windowed
    rope_local_theta: float | None = None  # the windowed layers' RoPE base (Gemma 3), unscaled; None: rope_theta's
    rotary_dim: int | None = None  # partial rotary: the features of each head that rotate (default: all)
    zero_init: bool = False
    bias: bool = True  # biases of the attention and feed-forward projections
    qkv_bias: bool | None = None  # biases of the query, key and value projections alone (Qwen2); None: as `bias`
    dropout: float = 0.0
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    type_vocab_size: int = 0  # BERT's token-type (segment) embeddings
    embedding_norm: bool = False  # BERT: LayerNorm right after the embeddings
    lm_head_bias: bool = False
    mlm_transform: bool = False  # BERT: dense + activation + norm before the masked-LM decoder
    scale_decoder_outputs: bool = False  # T5 (not v1.1): hidden states × d_model**-0.5 before the LM head
    fp16_clamp: bool = False  # T5: clamp hidden states to the float16 range after each sublayer (as transformers)
    num_labels: int = 0  # encoder: a sequence-classification head with this many classes
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # Llama 3.1 stops on any of several
    decoder_start_token_id: int = 0
    extra: dict = field(default_factory=dict)  # provenance (source format, names) kept with the weights

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise LlmkitError(f"unknown model family {self.family!r}", f"use one of: {', '.join(FAMILIES)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise LlmkitError(
                    f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}",
                    "pick n_heads that divides d_model, or set head_dim",
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise LlmkitError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}", "use n_kv_heads that divides n_heads"
            )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        for name, allowed in (
            ("position", ("sinusoidal", "learned", "rope", "relative")),
            ("activation", ("relu", "relu2", "gelu", "gelu_tanh", "swiglu", "geglu")),
            ("norm", ("layernorm", "rmsnorm")),
            ("norm_position", ("pre", "post")),
        ):
            if getattr(self, name) not in allowed:
                raise LlmkitError(f"unknown {name} {getattr(self, name)!r}", f"use one of: {', '.join(allowed)}")
        for name in ("logit_softcap", "attn_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LlmkitError(f"{name} must be positive, not {getattr(self, name)}", "use e.g. 15.0, or None for no cap")
        if self.sliding_window is not None and (self.sliding_window < 1 or self.family != "decoder"):
            raise LlmkitError(
                f"sliding_window {self.sliding_window} is not valid for a {self.family}", "use a window of 1 or more in a decoder, or None"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"sliding_attention", "full_attention"}:
                raise LlmkitError(
                    f"layer_types must name each of the {self.n_layers} layers sliding_attention or full_attention",
                    "fix the config's layer_types",
                )
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise LlmkitError(f"rotary_dim {self.rotary_dim} must be even and at most the head size {self.head_dim}", "fix rotary_dim")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") in (None, "default"):
            self.rope_scaling = None
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
            rotary = self.rotary_dim or self.head_dim
            for key in ("factors", "short_factor", "long_factor"):
                factors = self.rope_scaling.get(key)
                if factors is not None and len(factors) != rotary // 2:
                    raise LlmkitError(
                        f"RoPE {key}: {len(factors)} given, {rotary} rotating features need {rotary // 2}",
                        "check the config's rope_scaling (or the GGUF's rope_freqs tensor)",
                    )

    @property
    def eos_ids(self) -> list[int]:
        """Every end-of-sequence id of the model (a list in Llama 3.1's configs)."""
        e = self.eos_token_id
        return [] if e is None else [int(x) for x in (e if isinstance(e, list) else [e])]

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LlmkitError(f"unknown model config key(s): {', '.join(unknown)}", "remove them, or check the spelling")
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    # --- sizes -----------------------------------------------------------------------------------
    def param_count(self) -> int:
        """Parameters of the model this config builds (tied embeddings counted once)."""
        import torch

        from llmkit.model import build_model

        with torch.device("meta"):
            model = build_model(self)
        return sum(p.numel() for p in model.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> dict:
        """Training FLOPs per token, 6N + 12·L·d·T (Kaplan et al. 2020; PaLM appendix B), where N counts the
        weights that take part in matrix multiplies (not position embeddings, not a lookup-only input embedding) and a
        windowed layer's T is at most its window."""
        T = seq_len or self.max_seq_len
        assert self.head_dim is not None and self.n_kv_heads is not None and self.d_ff is not None  # set in __post_init__
        assert self.n_decoder_layers is not None
        D, V, hd = self.d_model, self.vocab_size, self.head_dim
        q_o = 2 * D * self.n_heads * hd
        kv = 2 * D * self.n_kv_heads * hd
        ff = (3 if self.gated else 2) * D * self.d_ff
        self_layer = q_o + kv + ff
        cross_layer = q_o + kv
        if self.family == "encoder-decoder":
            n_matmul = self.n_layers * self_layer + self.n_decoder_layers * (self_layer + cross_layer) + D * V
            attended = (self.n_layers + 2 * self.n_decoder_layers) * T
        else:
            n_matmul = self.n_layers * self_layer + D * V
            # a windowed layer attends to at most `sliding_window` positions
            window = self.sliding_window or T
            attended = sum(min(T, window) if self.windowed(i) else T for i in range(self.n_layers))
        attention = 12 * self.n_heads * hd * attended
        return {"matmul_params": n_matmul, "forward": 2 * n_matmul + attention // 3, "train": 6 * n_matmul + attention}


# --- RoPE scaling (transformers' `rope_scaling` / `rope_parameters`) ---------------------------------------------

# rope_type -> the keys it needs. `freq_factors` is llama.cpp's form (a GGUF's `rope_freqs` tensor: inv_freq / factor).
ROPE_SCALINGS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),
}


def check_rope_scaling(scaling: dict) -> None:
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise LlmkitError(
            f"RoPE scaling {kind!r} is not implemented", f"use a model whose rope_scaling is one of: {', '.join(ROPE_SCALINGS)} (or none)"
        )
    missing = [k for k in ROPE_SCALINGS[kind] if scaling.get(k) is None]
    if missing:
        raise LlmkitError(f"RoPE scaling {kind!r} lacks {', '.join(missing)}", "complete the model's rope_scaling in its config.json")


# --- presets: data, not subclasses -----------------------------------------------------------------

_GPT = dict(family="decoder", position="learned", activation="gelu_tanh", norm="layernorm", norm_position="pre", bias=True)
_LLAMA = dict(family="decoder", position="rope", activation="swiglu", norm="rmsnorm", norm_position="pre", bias=False, tie_embeddings=False)
_BERT = dict(
    family="encoder",
    position="learned",
    activation="gelu",
    norm="layernorm",
    norm_position="post",
    norm_eps=1e-12,
    bias=True,
    type_vocab_size=2,
    embedding_norm=True,
    lm_head_bias=True,
    mlm_transform=True,
)
_T5 = dict(
    family="encoder-decoder",
    position="relative",
    activation="relu",
    norm="rmsnorm",
    norm_eps=1e-6,
    norm_position="pre",
    bias=False,
    attn_scale=1.0,
    scale_decoder_outputs=True,
    fp16_clamp=True,
)

PRESETS: dict[str, dict] = {
    # Vaswani et al. 2017, "Attention Is All You Need", base model: sinusoidal positions, ReLU, post-norm.
    "vaswani": dict(
        family="encoder-decoder",
        vocab_size=37000,
        d_model=512,
        n_layers=6,
        n_heads=8,
        d_ff=2048,
        max_seq_len=512,
        position="sinusoidal",
        activation="relu",
        norm="layernorm",
        norm_eps=1e-6,
        norm_position="post",
        bias=True,
        dropout=0.1,
        scale_embeddings=True,
    ),
    "gpt2": dict(_GPT, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "gpt2-medium": dict(_GPT, vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "llama": dict(_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096),  # Llama-2-7B
    "smollm2-135m": dict(
        _LLAMA,
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
    "bert": dict(_BERT, vocab_size=30522, d_model=768, n_layers=12, n_heads=12, max_seq_len=512),  # bert-base
    "t5": dict(_T5, vocab_size=32128, d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_seq_len=512),  # t5-small
    # Small ones that train in minutes on a laptop CPU.
    "tiny-gpt": dict(_GPT, vocab_size=8192, d_model=256, n_layers=6, n_heads=8, max_seq_len=256),
    # The best 5-minute shape on 2 CPU cores with the GPT-2 recipe (benchmarks/RESULTS.md, issue 4).
    "cpu-gpt": dict(_GPT, vocab_size=2048, d_model=192, n_layers=4, n_heads=4, max_seq_len=128),
    # `llmkit pretrain`'s default: the speedrun recipe (modded-nanogpt, nanochat) at the size 5 minutes on 2 CPU cores
    # train: RoPE, RMSNorm, ReLU², QK-norm, an untied head, logit soft-capping, zero-initialized output projections
    # (trained with Muon and a warmup-stable-decay schedule by `llmkit pretrain`; benchmarks/RESULTS.md, issue 15).
    "cpu-modern": dict(
        family="decoder",
        vocab_size=1280,
        d_model=192,
        n_layers=4,
        n_heads=4,
        d_ff=576,  # 3x: 12% more steps in 5 minutes than 4x and 0.009 fewer bits per byte (3 seeds, benchmarks/RESULTS.md)
        max_seq_len=128,
        position="rope",
        norm="rmsnorm",
        norm_position="pre",
        activation="relu2",
        bias=False,
        qk_norm=True,
        tie_embeddings=False,
        logit_softcap=15.0,
        zero_init=True,
    ),
    "tiny-llama": dict(
        _LLAMA, vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=704, max_seq_len=256, tie_embeddings=True
    ),
    "tiny-bert": dict(_BERT, vocab_size=8192, d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "tiny-t5": dict(_T5, vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256),
    "tiny-vaswani": dict(
        family="encoder-decoder",
        vocab_size=8192,
        d_model=256,
        n_layers=3,
        n_heads=4,
        max_seq_len=256,
        position="sinusoidal",
        activation="relu",
        norm="layernorm",
        norm_position="post",
        scale_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise LlmkitError(f"unknown preset {name!r}", f"use one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def load_config(path) -> ModelConfig:
    with open(path, encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f))
