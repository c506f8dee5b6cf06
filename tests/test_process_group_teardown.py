"""destroy_process_group() must stop gloo's worker threads in a process that imported seqwrap first.

torch.distributed.nn.functional takes `group=group.WORLD` as a default argument. When it is imported
after init_process_group, as transformers does lazily (building a config is enough), its defaults keep
the live default group. destroy_process_group then cannot free that group, gloo's threads
(pt_gloo_runloop, gloo_tcp_loop) outlive it, and at interpreter exit a worker still freeing its last
collective aborts the process. That was the intermittent SIGABRT of the multi-rank tests and the
torchrun example. seqwrap imports the module at package import (seqwrap/parallel/__init__.py).
Linux only: the threads are read from /proc/self/task."""
import os
import tempfile

import pytest
import torch.multiprocessing as mp

pytest.importorskip("transformers")
if not os.path.isdir("/proc/self/task"):
    pytest.skip("needs Linux's /proc/self/task to list the process's threads", allow_module_level=True)


def _threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    return names


def _worker(rank, world, init_file, out_dir):
    import importlib

    importlib.import_module("seqwrap")          # what a user script does first
    import torch
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)  # imports torch.distributed.nn lazily
    t = torch.ones(3)
    dist.all_reduce(t)
    during = _threads()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(f"{','.join(during)}\n{','.join(_threads())}\n")


def test_destroy_process_group_stops_gloo_threads():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        for rank in range(2):
            with open(os.path.join(tmp, f"{rank}.txt")) as f:
                during, after = (line.strip().split(",") for line in f)
            assert "pt_gloo_runloop" in during, during    # the probe sees gloo's threads while the group lives
            assert not [n for n in after if "gloo" in n], (rank, after)
