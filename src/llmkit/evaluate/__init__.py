"""Evaluation: perplexity and bits per byte (more metrics come with the evaluation harness)."""
