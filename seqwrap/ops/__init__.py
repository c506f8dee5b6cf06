"""Thin Python wrappers around the C/CUDA core (seqwrap._C)."""
from .kahan import KahanAccumulator, kahan_accumulate_
from .sampler import sample_chunks

__all__ = ["KahanAccumulator", "kahan_accumulate_", "sample_chunks"]
