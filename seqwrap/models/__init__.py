"""Model adapters: how seqwrap finds the parts of a model it drives."""
from .hf import HFDecoderAdapter, UnsupportedModelError

__all__ = ["HFDecoderAdapter", "UnsupportedModelError"]
