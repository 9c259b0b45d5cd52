"""Evaluation: perplexity with the standard protocol, and model size accounting."""

from nibble.eval.perplexity import PerplexityResult, perplexity, perplexity_on_dataset

__all__ = ["PerplexityResult", "perplexity", "perplexity_on_dataset"]
