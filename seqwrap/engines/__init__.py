"""Chunk-wise training engines (SeCO, SpaCO) for Hugging Face causal LMs."""
from .seco import SeCO, StepResult

__all__ = ["SeCO", "StepResult"]
