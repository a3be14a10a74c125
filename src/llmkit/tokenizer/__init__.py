"""Tokenizers: train the six kinds, load real models' tokenizers, compare them on one corpus."""

from llmkit.tokenizer.core import DEFAULT_CHAT_TEMPLATE, SpecialTokens, Tokenizer
from llmkit.tokenizer.train import KINDS, train_tokenizer

__all__ = ["DEFAULT_CHAT_TEMPLATE", "KINDS", "SpecialTokens", "Tokenizer", "train_tokenizer"]
