"""Runs a function on N gloo processes (CPU) and collects what each rank returns."""
import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args):
    """fn(rank, world, *args) on `world` processes; returns the list of their return values."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_entry, args=(world, init_file, fn, args, results), nprocs=world, join=True)
            return [results[r] for r in range(world)]
