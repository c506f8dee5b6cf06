"""Plain Ulysses training and MsT under DeepSpeed ZeRO-1/2/3: `engine.backward(engine(**shard).loss)` after
seqwrap.parallel.deepspeed_ulysses(engine), 2 gloo ranks (CPU), float64 model.

Both ranks hold parts of ONE sequence (shard_batch over the Ulysses group = both ranks) and form ZeRO's
data-parallel group. Without the factor ZeRO's reduction divides the summed gradients by 2 (no mpu), so
the gradient would be half the whole sequence's; deepspeed_ulysses records s = D * P / N
(parallel/ulysses_deepspeed.py) and the model's outputs carry it into their gradients. Reference:
single-process full backprop of the whole sequence in float64; after engine.step() the parameters must
equal one SGD step with that gradient (ZeRO keeps float32 gradient partitions: 1e-6).

Also: a training forward of a ZeRO-managed Ulysses model without deepspeed_ulysses raises on every rank
(before any all-to-all), a no_grad forward does not, and a retry after the call is exact; SeCO on an
engine prepared this way is not scaled twice; deepspeed_ulysses refuses an unpatched module and a setup
no factor makes exact. The mpu cases run last (an mpu stays in deepspeed.utils.groups)."""
import copy
import faulthandler

import pytest
import torch

from .dist_utils import run_distributed
from .test_deepspeed_ulysses import CHUNK, _id, make_engine, reference, whole_batch
from .test_deepspeed_zero import LR, _deepspeed_on_cpu, count_ds_collectives, full_grads, full_params, llama, rel_err

pytest.importorskip("transformers")
pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

WORLD = 2
TOL = 1e-6


def _group(mode):
    if mode == "sp":
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        return mpu, mpu.get_sequence_parallel_group()
    return None, None


def backward_case(rank, kind, stage, mode):
    """kind "plain" (stock HF forward) or "mst" (apply_minisequence): engine(**shard).loss, engine.backward,
    engine.step(), against whole-sequence single-process backprop."""
    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    batch = whole_batch()
    base = llama()
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref_grads, ref_loss, _ = reference(copy.deepcopy(base), batch, "full", 0)
    model = copy.deepcopy(base)
    if kind == "mst":
        seqwrap.apply_minisequence(model, mlp_chunks=2)
    mpu, group = _group(mode)
    sp.apply_ulysses(model, group=group)
    engine = make_engine(model, stage, mpu=mpu)
    scale = sp.deepspeed_ulysses(engine)
    with count_ds_collectives() as counts:
        out = engine(**sp.shard_batch(batch, group or dist.group.WORLD))
        engine.backward(out.loss)
    grads = full_grads(engine)
    total = out.loss.detach().clone()
    dist.all_reduce(total, group=group)   # each rank's loss is its share of the whole sequence's mean
    engine.step()
    after = full_params(engine)
    expect = {n: start[n] - LR * ref_grads[n] for n in start}
    return dict(grad=rel_err(grads, ref_grads), loss=abs(total.item() - ref_loss), params=rel_err(after, expect),
                scale=scale, counts=dict(counts))


def guard_case(rank):
    """No deepspeed_ulysses: the training forward raises on every rank; no_grad runs; then the call and a
    retry that must be exact."""
    import seqwrap.parallel as sp
    import torch.distributed as dist

    batch = whole_batch()
    base = llama()
    ref_grads, ref_loss, _ = reference(copy.deepcopy(base), batch, "full", 0)
    model = copy.deepcopy(base)
    sp.apply_ulysses(model)
    engine = make_engine(model, 2)
    shard = sp.shard_batch(batch, dist.group.WORLD)
    try:
        engine(**shard)
        refused = None
    except RuntimeError as e:
        refused = str(e)
    with torch.no_grad():
        evaluated = engine(**shard).loss.item()
    scale = sp.deepspeed_ulysses(engine)
    out = engine(**shard)
    engine.backward(out.loss)
    return dict(refused=refused, evaluated=evaluated, scale=scale, grad=rel_err(full_grads(engine), ref_grads))


def seco_after_prepare_case(rank, stage):
    """SeCO(engine) on an engine deepspeed_ulysses prepared: SeCO scales its own chunk backwards and never
    calls the model's top-level forward, so the factor must not apply twice."""
    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    batch = whole_batch()
    base = llama()
    ref_grads, _, _ = reference(copy.deepcopy(base), batch, "full", 0)
    model = copy.deepcopy(base)
    sp.apply_ulysses(model)
    engine = make_engine(model, stage)
    sp.deepspeed_ulysses(engine)
    seqwrap.SeCO(engine, chunk_size=CHUNK)(**sp.shard_batch(batch, dist.group.WORLD, chunk_size=CHUNK))
    return dict(grad=rel_err(full_grads(engine), ref_grads))


def refusals(rank):
    """deepspeed_ulysses on what it cannot make exact: {what: exception type and message}."""
    import seqwrap.parallel as sp

    out = {}
    for what in ("not-patched", "predivide"):
        model = llama()
        if what == "not-patched":
            engine = make_engine(model, 2)
        else:
            sp.apply_ulysses(model)
            engine = make_engine(model, 2, gradient_predivide_factor=2.0, zero={"reduce_scatter": False})
        try:
            sp.deepspeed_ulysses(engine)
            out[what] = None
        except (ValueError, TypeError) as e:
            out[what] = (type(e).__name__, str(e))
    return out


CASES = [("plain", 1, None), ("plain", 2, None), ("plain", 3, None), ("mst", 2, None), ("mst", 3, None),
         ("plain", 2, "sp"), ("mst", 3, "sp")]
EXPECTED_SCALE = {("plain", 1, None): 2.0, ("plain", 2, None): 2.0, ("plain", 3, None): 2.0, ("mst", 2, None): 2.0,
                  ("mst", 3, None): 2.0, ("plain", 2, "sp"): 1.0, ("mst", 3, "sp"): 2.0}


def cases(rank, world):
    faulthandler.dump_traceback_later(200, exit=True)  # a hung collective dumps every stack
    try:
        _deepspeed_on_cpu(rank, world)
        out = {key: backward_case(rank, *key) for key in CASES if key[2] != "sp"}
        out["guard"] = guard_case(rank)
        out["seco2"] = seco_after_prepare_case(rank, 2)
        out["seco3"] = seco_after_prepare_case(rank, 3)
        out["refusals"] = refusals(rank)
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(world)   # from here on every engine sees the mpu
        out.update({key: backward_case(rank, *key) for key in CASES if key[2] == "sp"})
        return out
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def results():
    """Every case on both ranks, one 2-rank job: {case: [rank 0's result, rank 1's]}."""
    out = run_distributed(cases, WORLD, timeout_s=30)
    return {key: [r[key] for r in out] for key in out[0]}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_engine_backward_equals_whole_sequence_full_backprop(results, case):
    for rank, r in enumerate(results[case]):
        assert r["scale"] == EXPECTED_SCALE[case], (rank, r)
        assert r["grad"] < TOL, (rank, r)
        assert r["params"] < TOL, (rank, r)   # after engine.step(): one SGD step with the reference gradient
        assert r["loss"] < TOL, (rank, r)     # HF's loss casts the logits to float32 (the reference does not)
        c = r["counts"]   # DeepSpeed's own reductions: the factor adds no collective
        if case[1] == 3:
            assert c.get("reduce_scatter_tensor", 0) >= 1 and "all_reduce" not in c, c
        else:
            assert c.get("all_reduce") == 1, c


def test_unprepared_training_forward_refused_on_every_rank(results):
    for rank, r in enumerate(results["guard"]):
        assert r["refused"] is not None and "deepspeed_ulysses(engine)" in r["refused"], (rank, r)
        assert "1/2 of the whole sequence" in r["refused"], r["refused"]
        assert abs(r["evaluated"]) > 0.1, r        # the no_grad forward ran (a loss near log(61) / 2)
        assert r["scale"] == 2.0 and r["grad"] < TOL, (rank, r)


@pytest.mark.parametrize("stage", [2, 3])
def test_seco_on_a_prepared_engine_is_not_scaled_twice(results, stage):
    for rank, r in enumerate(results[f"seco{stage}"]):
        assert r["grad"] < TOL, (rank, r)


def test_deepspeed_ulysses_refusals(results):
    for r in results["refusals"]:
        kind, msg = r["not-patched"]
        assert kind == "ValueError" and "not patched by apply_ulysses" in msg, msg
        kind, msg = r["predivide"]
        assert kind == "ValueError" and "gradient_predivide_factor" in msg, msg


def test_deepspeed_ulysses_needs_an_engine():
    import seqwrap.parallel as sp

    with pytest.raises(TypeError, match="expects a deepspeed.DeepSpeedEngine, got Linear"):
        sp.deepspeed_ulysses(torch.nn.Linear(2, 2))
