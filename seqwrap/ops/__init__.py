"""Thin Python wrappers around the C/CUDA core (seqwrap._C), registered as torch custom ops (library.py), and
their float64 references (reference.py)."""
from . import library  # noqa: F401  (the seqwrap:: custom ops)
from . import reference
from .attention import chunked_attention
from .cross_entropy import linear_cross_entropy
from .kahan import KahanAccumulator, kahan_accumulate_
from .sampler import sample_chunks
from .selective_scan import selective_scan
from .ssd_scan import ssd_scan

__all__ = ["KahanAccumulator", "chunked_attention", "kahan_accumulate_", "linear_cross_entropy", "reference",
           "sample_chunks", "selective_scan", "ssd_scan"]
