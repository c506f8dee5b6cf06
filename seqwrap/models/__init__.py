"""Model adapters: how seqwrap's engines run a Hugging Face model chunk by chunk."""
from .mamba import MambaAdapter

__all__ = ["MambaAdapter"]
