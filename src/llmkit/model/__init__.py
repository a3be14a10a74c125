"""The transformer: one config (`config.py`), one module of layers (`layers.py`), three families (`families.py`),
weights in and out (`weights.py`: our run folders, Hugging Face folders, GGUF)."""

from llmkit.model.config import PRESETS, ModelConfig, preset
from llmkit.model.families import Decoder, Encoder, EncoderDecoder, LanguageModel
from llmkit.model.layers import KVCache


def build_model(cfg: ModelConfig, *, empty: bool = False, dtype=None, **kwargs) -> LanguageModel:
    """A randomly initialized model of the config's family; `empty=True` skips the initialization (for
    weights about to be loaded): parameters are allocated uninitialized, in `dtype` (no float32 copy first),
    and computed buffers (RoPE frequencies, sinusoidal tables) are rebuilt in float32."""
    import torch

    family = {"decoder": Decoder, "encoder": Encoder, "encoder-decoder": EncoderDecoder}[cfg.family]
    if not empty:
        model = family(cfg, **kwargs)
        return model.to(dtype) if dtype is not None else model
    with torch.device("meta"):
        model = family(cfg, **kwargs)
    if dtype is not None:
        model.to(dtype)
        if dtype == torch.float16 and cfg.fp16_clamp:  # T5: the feed-forward output projection stays float32
            for module in model.modules():
                if hasattr(module, "float32_down"):
                    module.down_proj.float()
                    module.float32_down = True
    model.to_empty(device="cpu")
    if cfg.tie_embeddings and hasattr(model, "lm_head") and model.lm_head is not None:
        model.lm_head.weight = (model.embed.tokens if hasattr(model, "embed") else model.enc_embed.tokens).weight
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    return model


__all__ = ["PRESETS", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "LanguageModel", "ModelConfig", "build_model", "preset"]
