"""AdjointSharding(exact) over 2 and 4 gloo processes on CPU equals single-process full backprop."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .mamba_utils import full_backprop, grads_of, max_rel_err, tiny_mamba

LENGTH, CHUNK = 40, 5


def _worker(rank, world, init_file, out_dir):
    import seqwrap
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_mamba(layers=2, seed=21)
        ids = torch.randint(0, 50, (2, LENGTH), generator=torch.Generator().manual_seed(3))
        labels = ids.clone()
        labels[:, 3] = -100
        out = seqwrap.AdjointSharding(model, chunk_size=CHUNK, group=dist.group.WORLD)(ids, labels)
        torch.save({"loss": out.loss, "grads": grads_of(model), "chunks": out.num_chunks},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_exact_equals_backprop(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    model = tiny_mamba(layers=2, seed=21)
    ids = torch.randint(0, 50, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, 3] = -100
    loss0, g0 = full_backprop(model, ids, labels)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        err, name = max_rel_err(res["grads"], g0)
        assert err <= 1e-10, (r, err, name)
        assert abs(res["loss"].item() - loss0.item()) <= 1e-6 * loss0.item()
        assert res["chunks"] == LENGTH // CHUNK


def test_sharded_with_group_is_refused():
    import seqwrap
    with pytest.raises(NotImplementedError, match="mode='exact' only"):
        seqwrap.AdjointSharding(tiny_mamba(layers=1), mode="sharded", group=object())
