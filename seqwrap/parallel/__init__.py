"""Sequence parallelism across processes (Ulysses all-to-all) for Hugging Face decoder LMs."""
from .sharding import allreduce_gradients, shard_batch
from .ulysses import apply_ulysses, remove_ulysses

__all__ = ["allreduce_gradients", "apply_ulysses", "remove_ulysses", "shard_batch"]
