"""DDP: gradients all-reduced once per step (not once per chunk), equal to single-process full
backprop of the whole batch. 2 gloo processes on CPU. (FSDP2: tests/test_fsdp2.py.)"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqwrap

from .hf_tiny import VOCAB, max_rel_err, reference, tiny_model

T = 20


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (2, T), generator=g)


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        calls = []
        real = dist.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        dist.all_reduce = counting
        model = DDP(tiny_model("llama"))
        ids = batch()[rank: rank + 1]
        out = seqwrap.SeCO(model, chunk_size=6)(ids)  # 4 chunks, 4 backward passes
        seco_calls = len(calls)
        seco = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        # inside no_sync (gradient accumulation): no communication at all
        model.zero_grad(set_to_none=True)
        with model.no_sync():
            seqwrap.SeCO(model, chunk_size=6)(ids)
        nosync_calls = len(calls) - seco_calls
        local = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        # SpaCO: ranks draw different chunks (different seeds); the step must not hang
        model.zero_grad(set_to_none=True)
        sp = seqwrap.SpaCO(model, chunk_size=6, rate=0.5, seed=100 + rank)(ids)
        torch.save({"seco": seco, "local": local, "seco_calls": seco_calls, "nosync_calls": nosync_calls,
                    "loss": out.loss, "spaco_backward": sp.backward_chunks}, f"{tmp}/rank{rank}.pt")
        dist.all_reduce = real
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    model = tiny_model("llama")
    ids = batch()
    loss, grads = reference(model, ids)  # whole batch, one process (equal label counts per rank)
    for r in (r0, r1):
        assert r["seco_calls"] == 1, "one all-reduce per step (one bucket), not one per chunk"
        assert r["nosync_calls"] == 0
        for n, p in model.named_parameters():
            p.grad = r["seco"][n]
        assert max_rel_err(model, grads) <= 1e-10
        assert r["spaco_backward"] >= 0
    assert abs((r0["loss"] + r1["loss"]).item() / 2 - loss.item()) <= 1e-10 * loss.item()
    # under no_sync each rank keeps its own gradient
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in r0["local"])
