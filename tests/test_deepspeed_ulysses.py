"""Ulysses sequence parallelism x DeepSpeed ZeRO-1/2/3 under SeCO and SpaCO, 2 gloo ranks (CPU), float64.

Both ranks hold parts of ONE sequence (shard_batch over the Ulysses group = both ranks) and form
ZeRO's data-parallel group. Reference: single-process full backprop of the whole sequence in float64
(SpaCO: single-process SpaCO with the same seed, which draws the same chunks); after engine.step() the
parameters must equal one SGD step with that gradient. ZeRO divides its reduction by what DeepSpeed
chooses (parallel/ulysses_deepspeed.py): engines built without an mpu (ZeRO divides by 2 at every stage:
the chunk backwards are scaled by 2), with DeepSpeed's own sequence-parallel mpu
(deepspeed.runtime.sequence_parallel.parallel_state_sp; ZeRO-1/2 then divide by 1: factor 1, ZeRO-3's
default reduce-scatter still by 2: factor 2), and with gradient_allreduce_op="sum" (ZeRO-2 divides by 1);
SeCO in DeepSpeed's bf16 mode at ZeRO-2/3 against the float64 reference (bf16 tolerance).
Setups that no factor makes exact are refused when the engine is built.

All cases run in ONE spawned 2-rank job; the no-mpu cases run first, because an mpu given to
deepspeed.initialize stays in deepspeed.utils.groups for every later engine of the process."""
import copy
import faulthandler

import pytest
import torch
import torch.nn.functional as F

from .dist_utils import run_distributed
from .test_deepspeed_zero import (LR, _deepspeed_on_cpu, count_ds_collectives, ds_config, full_grads, full_params,
                                  llama, rel_err)

pytest.importorskip("transformers")
pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

WORLD = 2
CHUNK, SEQ = 8, 24  # 3 chunks of 8 tokens, 4 per rank


def whole_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (1, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 2:5] = -100
    return {"input_ids": ids, "labels": labels}


def reference(model, batch, kind, seed):
    """Single process, the whole sequence: ({name: grad}, loss, recomputed chunks)."""
    import seqwrap

    if kind == "spaco":
        out = seqwrap.SpaCO(model, chunk_size=CHUNK, rate=0.5, seed=seed)(**batch)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, out.loss.item(), out.backward_chunks
    logits = model(input_ids=batch["input_ids"]).logits
    shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), reduction="sum") / (shift != -100).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item(), SEQ // CHUNK


def make_engine(model, stage, mpu=None, **zero):
    import deepspeed

    cfg = ds_config(stage)
    cfg["zero_optimization"].update(zero.pop("zero", {}))
    cfg.update(zero)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu, dist_init_required=False)
    return engine


def run_case(rank, kind, stage, mode):
    """One SeCO / SpaCO step on a fresh Ulysses-patched ZeRO-`stage` engine, then engine.step().
    mode: None (no mpu), "sp" (DeepSpeed's sequence-parallel mpu), "sum" (gradient_allreduce_op sum), "bf16"
    (DeepSpeed's bf16 mode: the engine casts the model to bfloat16, float32 master weights)."""
    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    batch, seed = whole_batch(), 3
    base = llama()
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref_grads, ref_loss, chunks = reference(copy.deepcopy(base), batch, kind, seed)
    model = copy.deepcopy(base)
    mpu = group = None
    if mode == "sp":
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        group = mpu.get_sequence_parallel_group()
    sp.apply_ulysses(model, group=group)
    extra = {"sum": {"gradient_allreduce_op": "sum"}, "bf16": {"bf16": {"enabled": True}}}.get(mode, {})
    engine = make_engine(model, stage, mpu=mpu, **extra)
    eng = (seqwrap.SpaCO(engine, chunk_size=CHUNK, rate=0.5, seed=seed) if kind == "spaco"
           else seqwrap.SeCO(engine, chunk_size=CHUNK))
    with count_ds_collectives() as counts:
        out = eng(**sp.shard_batch(batch, group or dist.group.WORLD, chunk_size=CHUNK))
    grads = full_grads(engine)
    engine.step()
    after = full_params(engine)
    expect = {n: start[n] - LR * ref_grads[n] for n in start}
    grads = {n: g.double() for n, g in grads.items()}
    after = {n: q.double() for n, q in after.items()}
    return dict(grad=rel_err(grads, ref_grads), loss=abs(out.loss.item() - ref_loss), params=rel_err(after, expect),
                chunks=(out.backward_chunks, chunks), scale=eng._reduction_scale, counts=dict(counts),
                n_params=len(start), sp_size=int(engine.optimizer.sequence_parallel_size))


def refusal(rank, what):
    """A setup no factor makes exact: the engine is built, SeCO must refuse it (ValueError, message)."""
    import types

    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    model = llama()
    if what == "predivide":        # ZeRO-2 all-reduce path with gradient_predivide_factor 2 (= the group size)
        sp.apply_ulysses(model)
        engine = make_engine(model, 2, gradient_predivide_factor=2.0, zero={"reduce_scatter": False})
    elif what == "zero3-no-reduce-scatter":  # ZeRO-3 + sequence-parallel mpu: per-bucket divisors
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        sp.apply_ulysses(model, group=mpu.get_sequence_parallel_group())
        engine = make_engine(model, 3, mpu=mpu, zero={"reduce_scatter": False})
    elif what == "not-the-mpu-group":  # the engine's sequence-parallel group is both ranks, Ulysses one rank
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        own = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
        sp.apply_ulysses(model, group=own)
        engine = make_engine(model, 2, mpu=mpu)
    elif what == "dp-without-ulysses":  # ZeRO's group one rank, the Ulysses group both: a stand-in engine
        from seqwrap.parallel.ulysses_deepspeed import reduction_scale

        own = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
        fake = types.SimpleNamespace(optimizer=types.SimpleNamespace(dp_process_group=own, sequence_parallel_size=1))
        try:
            reduction_scale(fake, dist.group.WORLD, "SeCO")
        except ValueError as e:
            return str(e)
        return None
    try:
        seqwrap.SeCO(engine, chunk_size=CHUNK)
    except ValueError as e:
        return str(e)
    return None


CASES = [("seco", 1, None), ("seco", 2, None), ("seco", 3, None), ("spaco", 1, None), ("spaco", 2, None),
         ("spaco", 3, None), ("seco", 2, "sum"), ("seco", 2, "bf16"), ("seco", 3, "bf16"), ("seco", 1, "sp"), ("seco", 2, "sp"), ("seco", 3, "sp"), ("spaco", 3, "sp")]
REFUSALS = ["predivide", "dp-without-ulysses", "zero3-no-reduce-scatter", "not-the-mpu-group"]


def cases(rank, world):
    faulthandler.dump_traceback_later(200, exit=True)  # a hung collective dumps every stack
    try:
        _deepspeed_on_cpu(rank, world)
        out = {key: run_case(rank, *key) for key in CASES if key[2] != "sp"}
        out.update({what: refusal(rank, what) for what in REFUSALS[:2]})
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(world)   # from here on every engine sees the mpu
        out.update({key: run_case(rank, *key) for key in CASES if key[2] == "sp"})
        out.update({what: refusal(rank, what) for what in REFUSALS[2:]})
        return out
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def results():
    """Every case on both ranks, one 2-rank job: {case: [rank 0's result, rank 1's]}."""
    out = run_distributed(cases, WORLD, timeout_s=30)
    return {key: [r[key] for r in out] for key in CASES + REFUSALS}


TOL = 1e-6  # ZeRO keeps float32 gradient partitions (tests/test_deepspeed_zero.py); a wrong factor is off by 2x
BF16_TOL = 3e-2  # DeepSpeed's bf16 mode: bf16 weights and activations, float32 gradient partitions

# the factor on the chunk backwards, and DeepSpeed's sequence_parallel_size, each case must have used
EXPECTED_SCALE = {("seco", 1, None): 2.0, ("seco", 2, None): 2.0, ("seco", 3, None): 2.0, ("spaco", 1, None): 2.0,
                  ("spaco", 2, None): 2.0, ("spaco", 3, None): 2.0, ("seco", 2, "sum"): 1.0, ("seco", 2, "bf16"): 2.0,
                  ("seco", 3, "bf16"): 2.0, ("seco", 1, "sp"): 1.0, ("seco", 2, "sp"): 1.0,
                  ("seco", 3, "sp"): 2.0, ("spaco", 3, "sp"): 2.0}


def _id(c):
    return f"{c[0]}-zero{c[1]}" + (f"-{c[2]}" if c[2] else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_equal_to_whole_sequence_full_backprop(results, case):
    for rank, r in enumerate(results[case]):
        assert r["scale"] == EXPECTED_SCALE[case], (rank, r)
        assert r["sp_size"] == (WORLD if case[2] == "sp" else 1), (rank, r)
        assert r["chunks"][0] == r["chunks"][1], (rank, r)      # SpaCO: rank 0's draw = the single-process draw
        if case[2] == "bf16":   # bf16 weights and compute against the float64 reference; a wrong factor is 0.5 off
            assert r["grad"] < BF16_TOL, (rank, r)
            assert r["loss"] < 2e-2, (rank, r)
            continue              # (a parameter check would measure bf16 rounding of the weights, not the step)
        assert r["grad"] < TOL, (rank, r)
        assert r["params"] < TOL, (rank, r)   # after engine.step(): one SGD step with the reference gradient
        assert r["loss"] < 1e-12, (rank, r)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gathered_once_reduced_once(results, case):
    """As without Ulysses: ZeRO-3 gathers each parameter once per step, one reduction per step."""
    for r in results[case]:
        c = r["counts"]
        if case[1] == 3:
            assert c.get("all_gather_into_tensor") == r["n_params"], c
            assert c.get("reduce_scatter_tensor") == 1, c
        else:
            assert "all_gather_into_tensor" not in c, c
            assert c.get("all_reduce") == 1, c


@pytest.mark.parametrize("what,needle", [
    ("predivide", "gradient_predivide_factor=2.0 is not supported under Ulysses"),
    ("dp-without-ulysses", "does not contain the Ulysses ranks"),
    ("zero3-no-reduce-scatter", "set zero_optimization.reduce_scatter=true"),
    ("not-the-mpu-group", "is not the Ulysses group"),
])
def test_wrong_setup_refused(results, what, needle):
    for r in results[what]:
        assert r is not None and needle in r, r
