"""Model adapters: how seqwrap's engines find and run the parts of a Hugging Face model."""
from .hf import HFDecoderAdapter, UnsupportedModelError
from .mamba import MambaAdapter

__all__ = ["HFDecoderAdapter", "MambaAdapter", "UnsupportedModelError"]
