"""Sequence parallelism across processes (Ulysses all-to-all), gradient synchronisation, and the FSDP2
schedule of the chunked engines (fsdp.py: FSDPSchedule, count_collectives).

No transformers import here: apply_ulysses / deepspeed_ulysses / remove_ulysses live in seqwrap/hf/ulysses.py and are
re-exported on first use.

Importing seqwrap also imports torch.distributed.nn.functional (torch 2.13), which transformers would
otherwise import lazily, e.g. while building a config. Its functions take `group=group.WORLD` as a
default argument, evaluated at import. Imported after init_process_group, they keep the live default
group: destroy_process_group cannot free it, gloo's worker threads outlive it into interpreter exit, and
a worker still freeing its last collective there takes the GIL during finalization and aborts the
process ("terminate called without an active exception"). Imported first, as here when seqwrap is
imported before init_process_group, the defaults are None."""
import importlib

import torch.distributed

if torch.distributed.is_available():
    importlib.import_module("torch.distributed.nn.functional")

from .fsdp import CollectiveCounts, FSDPSchedule, count_collectives  # noqa: E402
from .grad_sync import allreduce_gradients  # noqa: E402
from .sharding import shard_batch  # noqa: E402

_HF = ("apply_ulysses", "deepspeed_ulysses", "remove_ulysses")

__all__ = ["CollectiveCounts", "FSDPSchedule", "allreduce_gradients", "count_collectives", "apply_ulysses", "deepspeed_ulysses",
           "remove_ulysses", "shard_batch"]


def __getattr__(name):
    if name in _HF:
        from ..hf import ulysses

        return getattr(ulysses, name)
    raise AttributeError(f"module 'seqwrap.parallel' has no attribute {name!r}")
