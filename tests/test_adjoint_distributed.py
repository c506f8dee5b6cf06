"""AdjointSharding over 2 and 4 gloo processes on CPU: exact equals single-process full backprop;
sharded (untruncated and truncated) equals single-process sharded."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before any init_process_group: seqwrap/parallel/__init__.py
import torch.multiprocessing as mp

from .mamba_utils import full_backprop, grads_of, max_rel_err, tiny_mamba

LENGTH, CHUNK, TRUNC = 40, 5, 7     # TRUNC - 1 = 6 tokens of look-ahead: into the next rank's chunks
MODES = {"exact": dict(), "sharded": dict(mode="sharded"), "truncated": dict(mode="sharded", truncation=TRUNC)}


def _inputs():
    ids = torch.randint(0, 50, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, 3] = -100
    return ids, labels


def _run(model, group=None, **kw):
    import seqwrap
    model.zero_grad(set_to_none=True)
    out = seqwrap.AdjointSharding(model, chunk_size=CHUNK, group=group, **kw)(*_inputs())
    return {"loss": out.loss, "grads": grads_of(model), "chunks": out.num_chunks}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_mamba(layers=2, seed=21)
        res = {name: _run(model, dist.group.WORLD, **kw) for name, kw in MODES.items()}
        import seqwrap
        with torch.no_grad():  # forward-only: states handed from rank to rank, losses summed over the group
            res["evaluate"] = seqwrap.AdjointSharding(model, chunk_size=CHUNK, group=dist.group.WORLD)(*_inputs()).loss
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    torch.set_num_threads(1)
    model = tiny_mamba(layers=2, seed=21)
    loss0, g0 = full_backprop(model, *_inputs())
    ref = {"exact": {"loss": loss0, "grads": g0}}
    ref.update({name: _run(model, **MODES[name]) for name in ("sharded", "truncated")})
    assert max_rel_err(ref["truncated"]["grads"], ref["sharded"]["grads"])[0] > 1e-6   # truncation matters
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for name in MODES:
            err, pname = max_rel_err(res[name]["grads"], ref[name]["grads"])
            assert err <= 1e-10, (r, name, err, pname)
            assert abs(res[name]["loss"].item() - ref[name]["loss"].item()) <= 1e-6 * ref[name]["loss"].item()
            assert res[name]["chunks"] == LENGTH // CHUNK
        assert abs(res["evaluate"].item() - loss0.item()) <= 1e-6 * loss0.item()
