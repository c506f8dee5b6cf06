"""seqwrap: train PyTorch / Hugging Face models on very long sequences.

Importing seqwrap never needs a GPU: the CUDA kernels, when built in, are
only launched for CUDA tensors. `seqwrap.cuda_status()` says whether they
were built and whether a device here can run them. Nor does it need
transformers: the engines (SeCO, SpaCO), which build on its Cache API, are
imported on first use.
"""
from ._version import __version__
from .cuda import CudaStatus, cuda_status
from .hf import UnsupportedModelError, UnsupportedVersionError, apply_minisequence, remove_minisequence, verify
from .ops import KahanAccumulator, kahan_accumulate_, linear_cross_entropy, sample_chunks
from .planning import AutoChunk, AutoChunkNotice, Plan, PlanError, plan

_ENGINES = ("SeCO", "SpaCO", "StepResult", "AdjointSharding", "AdjointOutput")

__all__ = ["__version__", "CudaStatus", "cuda_status", "KahanAccumulator", "kahan_accumulate_", "linear_cross_entropy",
           "sample_chunks", "apply_minisequence", "remove_minisequence", "verify", "UnsupportedModelError",
           "UnsupportedVersionError", "plan", "Plan", "PlanError", "AutoChunk", "AutoChunkNotice", *_ENGINES]


def __getattr__(name):
    if name in _ENGINES:  # needs transformers: imported lazily
        from . import engines

        return getattr(engines, name)
    raise AttributeError(f"module 'seqwrap' has no attribute {name!r}")
