"""Adapters for Hugging Face models. transformers is imported lazily, only when a patched model runs."""
from .minisequence import apply_minisequence, is_minisequence_applied, remove_minisequence

__all__ = ["apply_minisequence", "is_minisequence_applied", "remove_minisequence"]
