"""Thin Python wrappers around the C/CUDA core (seqwrap._C)."""
from .kahan import KahanAccumulator, kahan_accumulate_
from .selective_scan import selective_scan

__all__ = ["KahanAccumulator", "kahan_accumulate_", "selective_scan"]
