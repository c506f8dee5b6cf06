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
        spaco = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        torch.save({"seco": seco, "local": local, "seco_calls": seco_calls, "nosync_calls": nosync_calls,
                    "loss": out.loss, "spaco_backward": sp.backward_chunks, "spaco_chunks": sp.num_chunks,
                    "spaco": spaco}, f"{tmp}/rank{rank}.pt")
        dist.all_reduce = real
    finally:
        dist.destroy_process_group()


SPACO_RATE, SPACO_CHUNK = 0.5, 6


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Runs the two gloo ranks once; the tests below read what each rank saved."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]


def test_ddp_two_gloo_processes(ddp_run):
    _, (r0, r1) = ddp_run
    model = tiny_model("llama")
    ids = batch()
    loss, grads = reference(model, ids)  # whole batch, one process (equal label counts per rank)
    for r in (r0, r1):
        # one all-reduce per step (one bucket), not one per chunk, after the ranks' agreement (one tiny all-reduce)
        assert r["seco_calls"] == 2, r["seco_calls"]
        assert r["nosync_calls"] == 0  # a step inside no_sync issues no collective, so none to agree on
        for n, p in model.named_parameters():
            p.grad = r["seco"][n]
        assert max_rel_err(model, grads) <= 1e-10
    assert abs((r0["loss"] + r1["loss"]).item() / 2 - loss.item()) <= 1e-10 * loss.item()
    # under no_sync each rank keeps its own gradient
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in r0["local"])


def test_ddp_spaco_ranks_draw_their_own_chunks(ddp_run):
    """Each rank recomputes the chunks its own seed draws (seed 100 + rank, first step), and the
    all-reduced gradient is the mean of what each rank's SpaCO step gives alone."""
    _, ranks = ddp_run
    ids = batch()
    alone = []
    for rank, r in enumerate(ranks):
        assert r["spaco_chunks"] == -(-T // SPACO_CHUNK)
        draw = seqwrap.sample_chunks(r["spaco_chunks"], probs=[SPACO_RATE] * r["spaco_chunks"], seed=100 + rank,
                                     step=0)
        assert r["spaco_backward"] == int((draw != 0).sum()), f"rank {rank}: {draw.tolist()}"
        model = tiny_model("llama")
        seqwrap.SpaCO(model, chunk_size=SPACO_CHUNK, rate=SPACO_RATE, seed=100 + rank)(ids[rank: rank + 1])
        alone.append({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()})
    for n in alone[0]:
        want = (alone[0][n] + alone[1][n]) / 2
        for rank, r in enumerate(ranks):
            torch.testing.assert_close(r["spaco"][n], want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}, {n}")
