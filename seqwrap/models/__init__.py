"""Model adapters: how seqwrap finds, runs and patches the parts of a Hugging Face model.
transformers is imported lazily, only when a model is adapted or a patched model runs."""
from .hf import HFDecoderAdapter, UnsupportedModelError
from .mamba import MambaAdapter
from .minisequence import apply_minisequence, is_minisequence_applied, remove_minisequence

__all__ = ["HFDecoderAdapter", "MambaAdapter", "UnsupportedModelError", "apply_minisequence",
           "is_minisequence_applied", "remove_minisequence"]
