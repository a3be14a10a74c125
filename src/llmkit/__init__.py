"""llmkit: a complete, fast, hackable large-language-model toolkit.

One package, one command (`llmkit`): tokenizers, data shards, transformers, pretraining, fine-tuning,
evaluation and serving, on embedded defaults that need no download (see DESIGN.md).
"""

__version__ = "0.1.0"

from llmkit.errors import LlmkitError


def load(name_or_path, **kwargs):
    """Load a model: `smollm2`, `minilm`, a run folder, a Hugging Face folder or a GGUF file.

    Returns a `torch.nn.Module` in eval mode; called on token ids (B, T) it gives logits (B, T, V) (hidden states
    for an encoder without a head). `.tokenizer` and `.config` hang on it.
    """
    from llmkit.model.weights import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["LlmkitError", "__version__", "load"]
