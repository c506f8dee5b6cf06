"""Thin Python wrappers around the C/CUDA core (seqwrap._C)."""
from .kahan import KahanAccumulator, kahan_accumulate_

__all__ = ["KahanAccumulator", "kahan_accumulate_"]
