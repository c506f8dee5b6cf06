"""Thin Python wrappers around the C/CUDA core (seqwrap._C)."""
from .cross_entropy import linear_cross_entropy
from .kahan import KahanAccumulator, kahan_accumulate_

__all__ = ["KahanAccumulator", "kahan_accumulate_", "linear_cross_entropy"]
