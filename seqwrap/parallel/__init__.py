"""Sequence parallelism across processes (Ulysses all-to-all) and gradient synchronisation.

No transformers import here: apply_ulysses / remove_ulysses live in seqwrap/hf/ulysses.py and are
re-exported on first use."""
from .grad_sync import allreduce_gradients
from .sharding import shard_batch

_HF = ("apply_ulysses", "remove_ulysses")

__all__ = ["allreduce_gradients", "apply_ulysses", "remove_ulysses", "shard_batch"]


def __getattr__(name):
    if name in _HF:
        from ..hf import ulysses

        return getattr(ulysses, name)
    raise AttributeError(f"module 'seqwrap.parallel' has no attribute {name!r}")
