"""Runs a function on N gloo processes (CPU) and collects what each rank returns.

The process group gets a short timeout (default 60 s, not gloo's 30 minutes), so a collective that
no other rank joins (a desynchronised step) fails the test in seconds instead of hanging CI."""
import os
import tempfile
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before any init_process_group: seqwrap/parallel/__init__.py
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 60


def _entry(rank, world, init_file, timeout_s, fn, args, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S):
    """fn(rank, world, *args) on `world` processes; returns the list of their return values.
    timeout_s: the process group's collective timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_entry, args=(world, init_file, timeout_s, fn, args, results), nprocs=world, join=True)
            return [results[r] for r in range(world)]
