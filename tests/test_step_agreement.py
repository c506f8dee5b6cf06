"""Collectives agreed across ranks (seqwrap/parallel/agreement.py), 2 gloo ranks with a 20 s timeout.

Each probe used to desynchronise the ranks (one returned, the other waited for the process-group
timeout): uneven chunk counts under a schedule whose collectives depend on the chunks, SpaCO draws that
differ per rank, a bad label on one rank. Now each finishes in seconds, with the gradients of plain FSDP2
backprop (float64), and the error of a bad input is raised on every rank.
"""
import time
import warnings

import pytest
import torch

from .dist_utils import run_distributed

transformers = pytest.importorskip("transformers")

WORLD = 2
TIMEOUT_S = 20  # a desynchronised step fails within this, instead of gloo's 30 minutes
SCHEDULES = [("step", "step"), ("layer", "step"), ("step", "chunk"), ("layer", "chunk")]


def _fsdp_helpers():
    from . import test_fsdp2 as t

    return t


def uneven_case(rank, world):
    """12 tokens on rank 0, 8 on rank 1, chunks of 4: 3 vs 2 chunks, under every schedule."""
    import seqwrap
    from seqwrap.parallel import FSDPSchedule, count_collectives

    t = _fsdp_helpers()
    ids, labels = t.batch(rank, seq=12 if rank == 0 else 8)
    ref = t.shard(t.llama())
    t.plain_step(ref, ids, labels)
    ref_grads = t.full_grads(ref)
    out = {}
    for sched in SCHEDULES:
        model = t.shard(t.llama())
        engine = seqwrap.SeCO(model, chunk_size=4, fsdp=FSDPSchedule(*sched))
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught, count_collectives() as counts:
            warnings.simplefilter("always")
            engine(ids, labels=labels)
        out[sched] = dict(err=t.rel_err(t.full_grads(model), ref_grads), seconds=time.monotonic() - start,
                          counts=counts, warned=[str(w.message) for w in caught if "different chunks" in str(w.message)],
                          sharded=t.all_sharded(model))
    return out


def worker(rank, world):
    """Every probe in one spawn (starting the processes costs more than the probes)."""
    return dict(uneven=uneven_case(rank, world), spaco=spaco_case(rank, world),
                bad={s: bad_label_case(rank, world, s) for s in BAD_LABEL_SCHEDULES},
                ulysses=ulysses_bad_label_case(rank, world), ulysses_uneven=ulysses_uneven_case(rank, world))


BAD_LABEL_SCHEDULES = [("step", "step"), ("layer", "chunk")]


@pytest.fixture(scope="module")
def probes():
    return run_distributed(worker, WORLD, timeout_s=TIMEOUT_S)


def test_uneven_chunk_counts_under_every_schedule_agree_and_equal_plain_backprop(probes):
    """Count-dependent schedules fall back to the default one for that call (with a warning): one
    all-gather and one reduce-scatter per group, and the agreement's one all-reduce of (2 + 4) int64."""
    t = _fsdp_helpers()
    groups = t.LAYERS + 1
    for rank, res in enumerate(p["uneven"] for p in probes):
        for sched, r in res.items():
            assert r["err"] < 1e-10, (rank, sched, r["err"])
            assert r["sharded"]
            assert r["seconds"] < TIMEOUT_S, (rank, sched, r["seconds"])
            c = r["counts"]
            assert (c.all_gathers, c.reduce_scatters) == (groups, groups), (rank, sched, c)
            assert (c.all_reduces, c.all_reduce_bytes) == (1, (3 * WORLD + 4) * 8), (rank, sched, c)
            dependent = sched != ("step", "step")
            assert bool(r["warned"]) == dependent, (rank, sched, r["warned"])
            if dependent:
                assert "2 to 3 chunks" in r["warned"][0]


def spaco_case(rank, world):
    """SpaCO with a seed per rank (different draws) under grads='chunk': the reference is each rank's
    SpaCO step on a plain (unsharded) model, averaged over the ranks as FSDP2 averages."""
    import torch.distributed as dist

    import seqwrap
    from seqwrap.parallel import FSDPSchedule, count_collectives

    t = _fsdp_helpers()
    ids, labels = t.batch(rank, seq=16)
    seed = 100 + rank
    draws = [seqwrap.sample_chunks(4, probs=[0.5] * 4, seed=100 + r, step=0).tolist() for r in range(world)]
    plain = t.llama()
    alone = seqwrap.SpaCO(plain, chunk_size=4, rate=0.5, seed=seed)(ids, labels=labels)
    ref = {}
    for n, p in plain.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        ref[n] = g / world
    model = t.shard(t.llama())
    engine = seqwrap.SpaCO(model, chunk_size=4, rate=0.5, seed=seed, fsdp=FSDPSchedule(grads="chunk"))
    with warnings.catch_warnings(record=True) as caught, count_collectives() as counts:
        warnings.simplefilter("always")
        res = engine(ids, labels=labels)
    return dict(draws=draws, err=t.rel_err(t.full_grads(model), ref), counts=counts,
                chunks=(res.backward_chunks, alone.backward_chunks),
                warned=any("different chunks" in str(w.message) for w in caught))


def test_spaco_draws_per_rank_agree(probes):
    results = [p["spaco"] for p in probes]
    draws = results[0]["draws"]
    selected = [[i for i, w in enumerate(d) if w] for d in draws]
    assert selected[0] != selected[1] and all(selected), draws  # the probe: the ranks recompute different chunks
    for rank, r in enumerate(results):
        assert r["chunks"][0] == r["chunks"][1] == len(selected[rank])
        assert r["err"] < 1e-10, (rank, r["err"])
        assert r["warned"]
        assert (r["counts"].all_gathers, r["counts"].reduce_scatters) == (_fsdp_helpers().LAYERS + 1,) * 2


def bad_label_case(rank, world, schedule):
    """Rank 1 holds a label outside the vocabulary: every rank raises at once; then every rank retries with
    good labels, and the retry's collectives pair (gradients of plain FSDP2 backprop)."""
    import seqwrap
    from seqwrap.parallel import FSDPSchedule, count_collectives

    t = _fsdp_helpers()
    ids, labels = t.batch(rank, seq=12)
    bad = labels.clone()
    if rank == 1:
        bad[1, 5] = 61  # vocabulary of 61
    model = t.shard(t.llama())
    engine = seqwrap.SeCO(model, chunk_size=4, fsdp=FSDPSchedule(*schedule))
    start = time.monotonic()
    err = None
    with count_collectives() as counts:
        try:
            engine(ids, labels=bad)
        except ValueError as e:
            err = str(e)
    seconds = time.monotonic() - start
    untouched = all(p.grad is None for p in model.parameters()) and t.all_sharded(model)
    engine(ids, labels=labels)
    ref = t.shard(t.llama())
    t.plain_step(ref, ids, labels)
    return dict(err=err, seconds=seconds, counts=counts, untouched=untouched,
                retry_err=t.rel_err(t.full_grads(model), t.full_grads(ref)))


@pytest.mark.parametrize("schedule", BAD_LABEL_SCHEDULES, ids=["step", "layer_chunk"])
def test_bad_label_on_one_rank_raises_on_every_rank_and_a_retry_pairs(probes, schedule):
    for rank, r in enumerate(p["bad"][schedule] for p in probes):
        assert r["err"] is not None, f"rank {rank} did not raise"
        assert "the input of rank 1 was refused" in r["err"] and "holds 61, outside [0, 61)" in r["err"], r["err"]
        assert r["seconds"] < TIMEOUT_S / 2, (rank, r["seconds"])
        # only the agreement ran (and, on that path, the exchange of the messages): no FSDP collective
        assert (r["counts"].all_gathers, r["counts"].reduce_scatters, r["counts"].all_reduces) == (0, 0, 1)
        assert r["untouched"]
        assert r["retry_err"] < 1e-10, (rank, r["retry_err"])


def ulysses_bad_label_case(rank, world):
    """Under Ulysses (no FSDP2) the label-count all-reduce used to be the collective that waited."""
    import seqwrap
    import seqwrap.parallel as sp

    from .test_ulysses import batch, tiny_model

    model = tiny_model("llama")
    sp.apply_ulysses(model)
    shard = sp.shard_batch(batch(), None, chunk_size=8)
    if rank == 0:
        shard["shift_labels"] = shard["shift_labels"].clone()
        shard["shift_labels"][0, 1] = -5
    engine = seqwrap.SeCO(model, chunk_size=8)
    try:
        engine(**shard)
        return None
    except ValueError as e:
        return str(e)


def test_bad_label_under_ulysses_raises_on_every_rank(probes):
    for rank, err in enumerate(p["ulysses"] for p in probes):
        assert err is not None and "the input of rank 0 was refused" in err and "holds -5" in err, (rank, err)


def ulysses_uneven_case(rank, world):
    """A SeCO / SpaCO training step under Ulysses whose ranks hold different shard lengths: rank 1 holds
    4 local tokens where rank 0 holds 12 (1 vs 3 chunks), or 10 (3 chunks each, split 4,4,4 vs 4,4,2).
    Each all-to-all pairs the ranks' chunks one for one, so before the agreement the step either waited
    or exchanged blocks of different sizes. Then a retry with equal shards, against full backprop."""
    import seqwrap
    import seqwrap.parallel as sp
    from seqwrap.parallel import count_collectives

    from .test_ulysses import batch, tiny_model

    model = tiny_model("llama")
    sp.apply_ulysses(model)
    shard = sp.shard_batch(batch(), None, chunk_size=8)
    out = {}
    for engine_cls in (seqwrap.SeCO, seqwrap.SpaCO):
        kw = dict(rate=0.5, seed=3) if engine_cls is seqwrap.SpaCO else {}
        engine = engine_cls(model, chunk_size=8, **kw)
        for keep in (4, 10):
            cut = {k: v[:, :keep] if torch.is_tensor(v) and v.dim() == 2 and rank == 1 else v
                   for k, v in shard.items()}
            start, err = time.monotonic(), None
            with count_collectives() as counts:
                try:
                    engine(**cut)
                except ValueError as e:
                    err = str(e)
            out[engine_cls.__name__, keep] = dict(err=err, seconds=time.monotonic() - start, counts=counts,
                                                 untouched=all(p.grad is None for p in model.parameters()))
    seqwrap.SeCO(model, chunk_size=8)(**shard)  # summed over the group: the whole sequence's gradient
    out["retry"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


def test_unequal_ulysses_shards_raise_on_every_rank_before_any_all_to_all(probes):
    from .test_ulysses import full_backprop_f64

    _, ref = full_backprop_f64("llama")
    for rank, res in enumerate(p["ulysses_uneven"] for p in probes):
        for engine in ("SeCO", "SpaCO"):
            for keep in (4, 10):
                r = res[engine, keep]
                assert r["err"] is not None, (rank, engine, keep)
                assert "the Ulysses ranks hold shards of different lengths" in r["err"], r["err"]
                assert f"rank 0: 12, rank 1: {keep}" in r["err"], r["err"]
                assert r["seconds"] < TIMEOUT_S / 2, (rank, engine, keep, r["seconds"])
                c = r["counts"]
                assert (c.all_reduces, c.all_to_alls) == (1, 0), (rank, engine, keep, c)
                assert r["untouched"]
        for n, g in res["retry"].items():
            err = ((g - ref[n]).norm() / ref[n].norm()).item()
            assert err < 1e-10, (rank, n, err)
