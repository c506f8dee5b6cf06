"""Sequence parallelism across processes (Ulysses all-to-all), gradient synchronisation, and the FSDP2
schedule of the chunked engines (fsdp.py: FSDPSchedule, count_collectives).

No transformers import here: apply_ulysses / deepspeed_ulysses / remove_ulysses live in seqwrap/hf/ulysses.py and are
re-exported on first use."""
from .fsdp import CollectiveCounts, FSDPSchedule, count_collectives
from .grad_sync import allreduce_gradients
from .sharding import shard_batch

_HF = ("apply_ulysses", "deepspeed_ulysses", "remove_ulysses")

__all__ = ["CollectiveCounts", "FSDPSchedule", "allreduce_gradients", "count_collectives", "apply_ulysses", "deepspeed_ulysses",
           "remove_ulysses", "shard_batch"]


def __getattr__(name):
    if name in _HF:
        from ..hf import ulysses

        return getattr(ulysses, name)
    raise AttributeError(f"module 'seqwrap.parallel' has no attribute {name!r}")
