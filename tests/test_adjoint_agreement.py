"""AdjointSharding's ranks agree before any collective (parallel/agreement.py), 2 gloo ranks, 20 s timeout.

Before: with group= a label outside the vocabulary on one rank failed that rank inside cross_entropy,
half way through pass 1, and the other rank waited in its recv until the process-group timeout; ranks
given different lengths split the chunks differently and their sends / receives paired silently wrong;
under FSDP2 a refused input failed after the all-gather and the other rank waited in its reduce-scatter.
Now every rank raises the same error after one all-reduce of (3 world + 4) int64, and a retry pairs.
Also SeCO.evaluate under Ulysses (its label-count all-reduce used to be the collective that waited)."""
import time

import pytest
import torch
import torch.distributed as dist

from .dist_utils import run_distributed
from .mamba_utils import full_backprop, grads_of, max_rel_err, tiny_mamba

pytest.importorskip("transformers")

WORLD, TIMEOUT_S = 2, 20
LENGTH, CHUNK = 20, 5


def inputs(length=LENGTH):
    ids = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(7))
    return ids, ids.clone()


def attempt(call):
    """(error message or None, seconds, counts of the collectives it issued)."""
    from seqwrap.parallel import count_collectives

    start = time.monotonic()
    with count_collectives() as counts:
        try:
            call()
            err = None
        except ValueError as e:
            err = str(e)
    return err, time.monotonic() - start, counts


def group_cases(rank):
    """group= (the chunks of one sequence over the ranks): refusals, then a retry with the same input."""
    import seqwrap

    out = {}
    model = tiny_mamba(layers=2, seed=5)
    engine = seqwrap.AdjointSharding(model, chunk_size=CHUNK, group=dist.group.WORLD)
    ids, labels = inputs()
    bad = labels.clone()
    if rank == 1:
        bad[0, 7] = 999                                   # outside the vocabulary of 50, on rank 1 only
    out["bad_label"] = attempt(lambda: engine(ids, bad))
    out["untouched"] = all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        out["bad_label_eval"] = attempt(lambda: engine(ids, bad))
    # uneven lengths: 4 vs 3 chunks; then equal lengths but other tokens on rank 1
    out["uneven"] = attempt(lambda: engine(*inputs(length=LENGTH if rank == 0 else LENGTH - CHUNK)))
    other = ids.clone()
    if rank == 1:
        other[1, 3] = (other[1, 3] + 1) % 50
    out["other_tokens"] = attempt(lambda: engine(other, labels))
    out["retry"] = attempt(lambda: engine(ids, labels))
    out["grads"] = grads_of(model)
    return out


def fsdp_case(rank):
    """FSDP2 (each rank its own batch): a bad label on rank 0 raises on both before the all-gather."""
    import seqwrap

    from .test_fsdp2 import full_grads, shard

    model = shard(tiny_mamba(layers=2, seed=5))
    engine = seqwrap.AdjointSharding(model, chunk_size=CHUNK)
    ids = torch.randint(0, 50, (2, LENGTH - 5 * rank), generator=torch.Generator().manual_seed(30 + rank))
    bad = ids.clone()
    if rank == 0:
        bad[1, 2] = -3
    out = {"bad_label": attempt(lambda: engine(ids, bad)), "retry": attempt(lambda: engine(ids, ids))}
    ref = shard(tiny_mamba(layers=2, seed=5))
    ref(ids, labels=ids).loss.backward()
    out["err"] = max_rel_err(full_grads(model), full_grads(ref))[0]
    return out


def seco_evaluate_case(rank):
    """SeCO.evaluate under Ulysses: a bad label on rank 0 raises on both; uneven shards are refused."""
    import seqwrap
    import seqwrap.parallel as sp

    from .test_ulysses import batch, tiny_model

    model = tiny_model("llama")
    sp.apply_ulysses(model)
    engine = seqwrap.SeCO(model, chunk_size=8)
    shard = sp.shard_batch(batch(), None, chunk_size=8)
    bad = dict(shard, shift_labels=shard["shift_labels"].clone())
    if rank == 0:
        bad["shift_labels"][0, 1] = -5
    out = {"bad_label": attempt(lambda: engine.evaluate(**bad))}
    cut = {k: v[:, :4] if torch.is_tensor(v) and v.dim() == 2 and rank == 1 else v for k, v in shard.items()}
    out["uneven"] = attempt(lambda: engine.evaluate(**cut))
    out["retry"] = engine.evaluate(**shard).loss.item()
    return out


def worker(rank, world):
    torch.set_num_threads(1)
    return dict(group=group_cases(rank), fsdp=fsdp_case(rank), seco=seco_evaluate_case(rank))


@pytest.fixture(scope="module")
def probes():
    return run_distributed(worker, WORLD, timeout_s=TIMEOUT_S)


def assert_refused_fast(r, *needles, all_reduces=1):
    err, seconds, counts = r
    assert err is not None and all(n in err for n in needles), (err, needles)
    assert seconds < TIMEOUT_S / 2, seconds
    # the agreement alone: no send / recv pairing, no FSDP2 all-gather or reduce-scatter
    assert (counts.all_gathers, counts.reduce_scatters, counts.all_reduces) == (0, 0, all_reduces), counts


def test_group_refusals_raise_on_every_rank_and_a_retry_equals_full_backprop(probes):
    ref_loss, ref = full_backprop(tiny_mamba(layers=2, seed=5), *inputs())
    for rank, r in enumerate(p["group"] for p in probes):
        assert_refused_fast(r["bad_label"], "the input of rank 1 was refused", "labels hold 999, outside [0, 50)")
        assert_refused_fast(r["bad_label_eval"], "the input of rank 1 was refused", "labels hold 999")
        assert r["untouched"]
        assert_refused_fast(r["uneven"], "were given different inputs (3 to 4 chunks")
        assert_refused_fast(r["other_tokens"], "were given different inputs (4 to 4 chunks")
        assert r["retry"][0] is None
        err, name = max_rel_err(r["grads"], ref)
        assert err <= 1e-10, (rank, name, err)


def test_fsdp2_bad_label_raises_on_every_rank_before_the_all_gather(probes):
    for rank, r in enumerate(p["fsdp"] for p in probes):
        assert_refused_fast(r["bad_label"], "the input of rank 0 was refused", "labels hold -3")
        assert r["retry"][0] is None
        assert r["err"] < 1e-10, (rank, r["err"])


def test_seco_evaluate_under_ulysses_agrees(probes):
    from .test_ulysses import batch, tiny_model

    for rank, r in enumerate(p["seco"] for p in probes):
        assert_refused_fast(r["bad_label"], "the input of rank 0 was refused", "holds -5")
        assert_refused_fast(r["uneven"], "the Ulysses ranks hold")
        with torch.no_grad():
            ref = tiny_model("llama")(**batch()).loss.item()
        assert abs(r["retry"] - ref) <= 1e-5 * abs(ref), (rank, r["retry"], ref)
