"""Ulysses x DeepSpeed ZeRO-2/3 on 4 gloo ranks (CPU), float64 model: one sequence over all four ranks
(sp = 4), and two data-parallel replicas of a 2-rank Ulysses group each (sp = 2 x dp = 2) holding different
sequences of different lengths. ZeRO's data-parallel group is all four ranks (no mpu, then DeepSpeed's own
sequence-parallel mpu with groups of 2).

Reference: single-process full backprop of each replica's whole sequence in float64, averaged over the
replicas; after engine.step() the parameters must equal one SGD step with that gradient. SeCO scales its
chunk backwards by s = D * P / N, a plain engine.backward gets it from deepspeed_ulysses
(parallel/ulysses_deepspeed.py): no mpu, sp = 4: s = 4 (ZeRO divides by 4, the whole gradient is the sum of
4 ranks); sp = 2 x dp = 2: s = 2 (sum of 2, mean of 2 replicas); with the mpu at ZeRO-2 DeepSpeed divides by
N / sp = 2 itself: s = 1."""
import copy
import faulthandler

import pytest
import torch

from .dist_utils import run_distributed
from .test_deepspeed_ulysses import CHUNK, make_engine, reference
from .test_deepspeed_zero import LR, _deepspeed_on_cpu, full_grads, full_params, llama, rel_err

pytest.importorskip("transformers")
pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

WORLD = 4
TOL = 1e-6
LENGTHS = (24, 16)   # replica 0: 3 chunks of 8, replica 1: 2 chunks


def replica_batch(replica, seq):
    g = torch.Generator().manual_seed(40 + replica)
    ids = torch.randint(0, 61, (1, seq), generator=g)
    labels = ids.clone()
    labels[0, 1 + replica:4 + replica] = -100
    return {"input_ids": ids, "labels": labels}


def run_case(rank, sp_size, kind, stage, mpu_mode):
    """One step on a fresh Ulysses-patched ZeRO-`stage` engine: kind "seco" (SeCO(engine)), "plain"
    (engine.backward of the stock forward) or "mst" (apply_minisequence), then engine.step()."""
    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    replicas = WORLD // sp_size
    replica = rank // sp_size
    batches = [replica_batch(r, LENGTHS[r] if replicas > 1 else LENGTHS[0]) for r in range(replicas)]
    base = llama()
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    refs = [reference(copy.deepcopy(base), b, "full", 0) for b in batches]
    ref_grads = {n: sum(r[0][n] for r in refs) / replicas for n in start}
    mpu = None
    if mpu_mode:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        group = mpu.get_sequence_parallel_group()
    else:
        groups = [dist.new_group(list(range(g * sp_size, (g + 1) * sp_size))) for g in range(replicas)]
        group = groups[replica]
    model = copy.deepcopy(base)
    if kind == "mst":
        seqwrap.apply_minisequence(model, mlp_chunks=2)
    sp.apply_ulysses(model, group=group)
    engine = make_engine(model, stage, mpu=mpu)
    if kind == "seco":
        eng = seqwrap.SeCO(engine, chunk_size=CHUNK)
        out = eng(**sp.shard_batch(batches[replica], group, chunk_size=CHUNK))
        scale = eng._reduction_scale
    else:
        scale = sp.deepspeed_ulysses(engine)
        out = engine(**sp.shard_batch(batches[replica], group))
        engine.backward(out.loss)
    loss = out.loss.detach().clone()
    if kind != "seco":   # a plain forward's loss is this rank's share of its replica's mean
        dist.all_reduce(loss, group=group)
    grads = full_grads(engine)
    engine.step()
    after = full_params(engine)
    expect = {n: start[n] - LR * ref_grads[n] for n in start}
    return dict(grad=rel_err(grads, ref_grads), params=rel_err(after, expect), scale=scale,
                loss=abs(loss.item() - refs[replica][1]), replica=replica)


CASES = [(4, "seco", 2, None), (4, "seco", 3, None), (4, "plain", 2, None),
         (2, "seco", 2, None), (2, "seco", 3, None), (2, "plain", 3, None), (2, "mst", 2, None),
         (2, "seco", 2, "sp"), (2, "plain", 2, "sp"), (2, "mst", 3, "sp")]
EXPECTED_SCALE = {(4, "seco", 2, None): 4.0, (4, "seco", 3, None): 4.0, (4, "plain", 2, None): 4.0,
                  (2, "seco", 2, None): 2.0, (2, "seco", 3, None): 2.0, (2, "plain", 3, None): 2.0,
                  (2, "mst", 2, None): 2.0, (2, "seco", 2, "sp"): 1.0, (2, "plain", 2, "sp"): 1.0,
                  (2, "mst", 3, "sp"): 2.0}


def cases(rank, world):
    faulthandler.dump_traceback_later(400, exit=True)  # a hung collective dumps every stack
    try:
        _deepspeed_on_cpu(rank, world)
        out = {key: run_case(rank, *key) for key in CASES if key[3] is None}
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(2)   # from here on every engine sees the mpu
        out.update({key: run_case(rank, *key) for key in CASES if key[3] == "sp"})
        return out
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def results():
    out = run_distributed(cases, WORLD, timeout_s=60)
    return {key: [r[key] for r in out] for key in CASES}


def _id(c):
    return f"sp{c[0]}-{c[1]}-zero{c[2]}" + (f"-{c[3]}" if c[3] else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_equal_to_the_replicas_mean_of_whole_sequence_backprop(results, case):
    for rank, r in enumerate(results[case]):
        assert r["replica"] == rank // case[0]
        assert r["scale"] == EXPECTED_SCALE[case], (rank, r)
        assert r["grad"] < TOL, (rank, r)
        assert r["params"] < TOL, (rank, r)
        # SeCO's loss is float64; HF's stock loss (plain / MsT) casts the logits to float32 first
        assert r["loss"] < (1e-12 if case[1] == "seco" else TOL), (rank, r)
