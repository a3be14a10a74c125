"""llmkit: a complete, fast, hackable large-language-model toolkit.

One package, one command (`llmkit`): tokenizers, data shards, transformers, pretraining, fine-tuning,
evaluation and serving, on embedded defaults that need no download (see DESIGN.md).
"""

__version__ = "0.1.0"

from llmkit.errors import LlmkitError

__all__ = ["LlmkitError", "__version__"]
