"""seqwrap: train PyTorch / Hugging Face models on very long sequences.

Importing seqwrap never needs a GPU: the CUDA kernels, when built in, are
only launched for CUDA tensors. `seqwrap.cuda_status()` says whether they
were built and whether a device here can run them.
"""
from ._version import __version__
from .cuda import CudaStatus, cuda_status
from .models import apply_minisequence, remove_minisequence
from .ops import KahanAccumulator, kahan_accumulate_, linear_cross_entropy

__all__ = [
    "__version__", "CudaStatus", "cuda_status", "KahanAccumulator", "kahan_accumulate_", "linear_cross_entropy",
    "apply_minisequence", "remove_minisequence",
]
