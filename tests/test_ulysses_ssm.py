"""Ulysses for Mamba-2-family layers (split over SSM heads) on 2 and 4 gloo processes equals single-process
full backprop of the whole sequence in float64 (plain Ulysses forward, SeCO and SpaCO over Ulysses; Mamba-2
and Bamba, plus SeCO on NemotronH and GraniteMoeHybrid on 2 ranks; Zamba2's plain forward on 2 ranks, and
SeCO on a Ulysses-patched Zamba2 refused by name: its shared attention blocks need attention='concat',
which Ulysses' chunked attention does not offer).

The tiny models have 4 SSM heads in 2 B/C groups: on 2 ranks each rank owns one group, on 4 ranks a group
is replicated to the two ranks whose heads read it (both branches of parallel/ulysses_ssm.HeadSplit)."""
import contextlib
import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .dist_utils import DEFAULT_TIMEOUT_S, _entry
from .hybrid_tiny import VOCAB, pure_float64, tiny_hybrid

pytest.importorskip("transformers")

S = 20       # tokens per row; SeCO chunks of 8: 8 + 8 + 4 (on 4 ranks the last chunk is one token per rank)
CHUNK = 8
TOL = 1e-10
OTHER_FAMILIES = ("nemotron_h", "granitemoehybrid")  # the other Mamba-2 mixers: SeCO on 2 ranks


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, S), generator=g)
    labels = ids.clone()
    labels[1, torch.randperm(S, generator=g)[:4]] = -100
    return {"input_ids": ids, "labels": labels}


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the in-process references: the float64 depthwise conv1d of the Mamba-2 mixer
    takes 0.1 s on one thread and > 10 s on two threads of a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def reference(family):
    """Full backprop of the whole sequence in one process: (loss, {name: grad}), loss formed in float64."""
    model = tiny_hybrid(family)
    data = batch()
    with one_thread():
        with pure_float64():
            logits = model(data["input_ids"], use_cache=False).logits
        shift = F.pad(data["labels"][:, 1:], (0, 1), value=-100)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), shift.reshape(-1), reduction="sum") / \
            (shift != -100).sum()
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def plain_step(family):
    """model(**shard) on contiguous shards, the loss summed and the gradients all-reduced by hand."""
    import seqwrap.parallel as sp

    model = tiny_hybrid(family)
    sp.apply_ulysses(model)
    shard = sp.shard_batch(batch())
    with pure_float64():
        logits = model(shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), shard["shift_labels"].reshape(-1), reduction="sum") / \
        shard["num_items_in_batch"]
    loss.backward()
    sp.allreduce_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item(), grads(model)


def engine_step(family, engine="seco", single=False):
    """SeCO / SpaCO over the Ulysses-patched model on this rank's interleaved shard (single=True: the same
    engine in one process over the whole sequence, the SpaCO reference)."""
    import seqwrap
    import seqwrap.parallel as sp

    model = tiny_hybrid(family)
    cls = seqwrap.SpaCO if engine == "spaco" else seqwrap.SeCO
    kw = dict(rate=0.5, seed=3) if engine == "spaco" else {}
    with pure_float64():
        if single:
            out = cls(model, chunk_size=CHUNK, **kw)(**batch())
        else:
            sp.apply_ulysses(model)
            out = cls(model, chunk_size=CHUNK, **kw)(**sp.shard_batch(batch(), chunk_size=CHUNK))
    return out.loss.item(), out.backward_chunks, grads(model)


def refusals(world):
    """The messages of configurations that cannot be split, and whether a refused model stayed unpatched."""
    import seqwrap.parallel as sp
    from seqwrap.parallel.ulysses_ssm import HeadSplit

    out = {}
    jamba = tiny_hybrid("jamba")  # attention layers and Mamba-1 mixers
    for name, call in {
        "heads": lambda: HeadSplit.make(None, 6 if world == 4 else 5, 8, 1, 8, "mixer x"),
        "groups": lambda: HeadSplit.make(None, 12, 8, 3, 8, "mixer x") if world == 4 else
        HeadSplit.make(None, 6, 8, 3, 8, "mixer x"),
        "mamba1": lambda: sp.apply_ulysses(jamba),
    }.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    out["jamba_patched"] = any(hasattr(m, "_seqwrap_ulysses") for m in jamba.modules())
    odd = tiny_hybrid("mamba2", num_heads=8, head_dim=8, n_groups=8)  # 8 heads: fine on 2 and 4 ranks
    sp.apply_ulysses(odd)
    mixers = [m for m in odd.modules() if type(m).__name__ == "Mamba2Mixer"]
    out["patched"] = all("forward" in m.__dict__ for m in mixers)
    sp.remove_ulysses(odd)
    out["restored"] = all("forward" not in m.__dict__ and not hasattr(m, "_seqwrap_ulysses_ssm") for m in mixers)
    return out


def worker(rank, world):
    # CI time: the plain forward and SpaCO run on 2 ranks only; SeCO on both families and the refusals on both
    torch.set_num_threads(1)  # forked from a process whose OpenMP pool may be live: stay out of it
    out = {"seco": {f: engine_step(f) for f in ("mamba2", "bamba")}, "refusals": refusals(world)}
    if world == 2:
        out.update(plain=plain_step("mamba2"), spaco=engine_step("bamba", "spaco"),
                   other={f: engine_step(f) for f in OTHER_FAMILIES}, zamba2=zamba2_case())
    return out


def zamba2_case():
    """Zamba2 (Mamba-2 mixers + shared attention blocks): the plain Ulysses step, and what SeCO says on the
    patched model with either attention mode."""
    import seqwrap
    import seqwrap.parallel as sp

    out = {"plain": plain_step("zamba2")}
    model = tiny_hybrid("zamba2")
    sp.apply_ulysses(model)
    for attention in ("chunked", "concat"):
        try:
            seqwrap.SeCO(model, chunk_size=CHUNK, attention=attention)
            out[attention] = None
        except (ValueError, seqwrap.UnsupportedModelError) as e:
            out[attention] = str(e)
    return out


def run_forked(fn, world):
    """dist_utils.run_distributed with fork instead of spawn: the ranks inherit this process's imported
    transformers and Mamba-2/Bamba modules, which cost ~12 s per spawned process (the steps take < 1 s)."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_entry, args=(world, os.path.join(tmp, "store"), DEFAULT_TIMEOUT_S, fn, (), results),
                           nprocs=world, join=True, start_method="fork")
        return [results[r] for r in range(world)]


@functools.lru_cache(maxsize=None)
def distributed_results(world):
    for family in ("mamba2", "bamba", "zamba2") + OTHER_FAMILIES:
        reference(family)  # imports the modelling code here, once, before the fork
    return run_forked(worker, world)


def assert_matches(what, loss, got, ref_loss, ref):
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (what, loss, ref_loss)
    for name, g in got.items():
        torch.testing.assert_close(g, ref[name], rtol=TOL, atol=1e-12, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_plain_ulysses_and_seco_match_full_backprop(world):
    results = distributed_results(world)
    for family in ("mamba2", "bamba"):
        ref_loss, ref = reference(family)
        for rank, res in enumerate(results):
            if "plain" in res and family == "mamba2":
                loss, got = res["plain"]
                assert_matches(f"plain {family} rank {rank}", loss, got, ref_loss, ref)
            loss, chunks, got = res["seco"][family]
            assert chunks == -(-S // CHUNK)
            assert_matches(f"seco {family} rank {rank}", loss, got, ref_loss, ref)


def test_seco_on_the_other_mamba2_families_matches_full_backprop():
    for family in OTHER_FAMILIES:
        ref_loss, ref = reference(family)
        for rank, res in enumerate(distributed_results(2)):
            loss, chunks, got = res["other"][family]
            assert chunks == -(-S // CHUNK)
            assert_matches(f"seco {family} rank {rank}", loss, got, ref_loss, ref)


@pytest.mark.parametrize("world", [2])
def test_spaco_matches_the_same_draw_in_one_process(world):
    with one_thread():
        ref_loss, ref_chunks, ref = engine_step("bamba", "spaco", single=True)
    assert 0 < ref_chunks < -(-S // CHUNK)  # a real sparse step
    for rank, res in enumerate(distributed_results(world)):
        loss, chunks, got = res["spaco"]
        assert chunks == ref_chunks
        assert_matches(f"spaco rank {rank}", loss, got, ref_loss, ref)


@pytest.mark.parametrize("world", [2, 4])
def test_bad_configurations_refused(world):
    res = distributed_results(world)[0]["refusals"]
    assert f"SSM heads, which cannot be split over {world} ranks" in res["heads"]
    assert f"3 B/C groups; under Ulysses over {world} ranks" in res["groups"]
    assert "JambaMambaMixer" in res["mamba1"] and "cannot split over heads" in res["mamba1"]
    assert not res["jamba_patched"]
    assert res["patched"] and res["restored"]


def test_zamba2_plain_ulysses_matches_and_seco_is_refused_by_name():
    ref_loss, ref = reference("zamba2")
    for rank, res in enumerate(distributed_results(2)):
        loss, got = res["zamba2"]["plain"]
        assert_matches(f"plain zamba2 rank {rank}", loss, got, ref_loss, ref)
        assert "shares its attention blocks between layers" in res["zamba2"]["chunked"], res["zamba2"]
        assert "a model patched for Ulysses needs attention='chunked'" in res["zamba2"]["concat"], res["zamba2"]
