"""Chunk-wise training engines (SeCO, SpaCO) for Hugging Face causal LMs."""
from .seco import SeCO, StepResult
from .spaco import SpaCO, proportional_to_labels

__all__ = ["SeCO", "SpaCO", "StepResult", "proportional_to_labels"]
