"""DeepSpeed ZeRO-1 / ZeRO-2 / ZeRO-3 under SeCO, SpaCO and MsT, on 2 gloo ranks (CPU), in float64.

Reference: single-process full backprop of each rank's whole sequence (float64), gradients averaged
over the ranks (ZeRO's data-parallel mean); after engine.step() the parameters must equal one SGD step
from the same start with that gradient. Collectives are counted at deepspeed.comm's backend (cdb),
which every ZeRO collective goes through. ZeRO-1 (SeCO, SpaCO): the float64 model's gradients go through
DeepSpeed's grad_accum attribute (accumulation dtype float32), which the step fills itself (DeepSpeedStep).

All cases run in sequence inside ONE spawned 2-rank job (process start and `import deepspeed` cost
seconds each); each case returns its measurements and the asserts run in the parent."""
import collections
import contextlib
import copy
import faulthandler
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from .dist_utils import run_distributed

pytest.importorskip("transformers")
pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

WORLD = 2
LR = 0.1
_COUNTED = ("all_gather_into_tensor", "all_gather", "allgather_fn", "all_gather_coalesced", "reduce_scatter_tensor",
            "reduce_scatter", "reduce_scatter_fn", "all_reduce", "all_reduce_coalesced", "reduce", "broadcast",
            "all_to_all_single")


def _deepspeed_on_cpu(rank, world):
    """What each rank needs before `import deepspeed` / deepspeed.initialize on a CPU-only gloo group.

    DS_ACCELERATOR=cpu: the accelerator is chosen at import. LOCAL_RANK & co: DeepSpeedEngine asserts
    them (a launcher sets them; run_distributed is not one). No shared-memory comm op: DeepSpeed's CPU
    backend JIT-compiles it (C++, ~1 min) in deepspeed.initialize, waiting forever on a stale
    ~/.cache/torch_extensions lock left by a killed build (the hang of the first probe); gloo's own
    collectives serve ZeRO (the op only speeds up CPU inference all-reduces)."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    import deepspeed  # noqa: F401
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    torch.set_num_threads(1)


def llama(layers=2):
    from .hf_tiny import tiny_model

    return tiny_model("llama", layers=layers, pure64=True)


def batch(rank, seq=24, b=1, vocab=61):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, vocab, (b, seq), generator=g)
    labels = ids.clone()
    labels[0, 2:5] = -100
    return ids, labels


def reference(model, ids, labels, world):
    """Full backprop of this rank's sequence, gradients averaged over the ranks: ({name: grad}, loss)."""
    import torch.distributed as dist

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1).double(), shift.flatten(), reduction="sum") / (shift != -100).sum()
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[n] = g / world
    return grads, loss.detach()


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def make_engine(model, stage):
    import deepspeed

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage), dist_init_required=False)
    return engine


@contextlib.contextmanager
def count_ds_collectives():
    """Counts calls of deepspeed.comm's backend methods inside the block, by name."""
    from deepspeed.comm import comm

    counts = collections.Counter()
    cdb = comm.cdb
    saved = []
    for name in _COUNTED:
        fn = getattr(cdb, name, None)
        if fn is None:
            continue
        saved.append(name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)
        setattr(cdb, name, wrapped)
    try:
        yield counts
    finally:
        for name in saved:
            delattr(cdb, name)   # back to the class's method


def full_grads(engine):
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}


def full_params(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def rel_err(got, ref):
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def load(model, params):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model


def spaco_reference(model, ids, labels, world, chunk, seed):
    """SpaCO of this rank's sequence on a plain single-process model (same seed: the same draw),
    gradients averaged over the ranks: what ZeRO's mean of the ranks' SpaCO gradients must equal."""
    import torch.distributed as dist

    import seqwrap

    model.zero_grad(set_to_none=True)
    out = seqwrap.SpaCO(model, chunk_size=chunk, rate=0.5, seed=seed)(ids, labels=labels)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[n] = g / world
    return grads, out.loss.detach(), out.backward_chunks


CHUNK, SEQ = 8, 24  # 3 chunks per step


def run_case(rank, world, kind, stage):
    """One engine step of `kind` on a fresh ZeRO-`stage` engine; then engine.step(). Returns the errors
    against the float64 single-process reference and the collectives of the seqwrap step."""
    import seqwrap

    ids, labels = batch(rank, seq=SEQ)
    base = llama()
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    seed = 11 + rank  # SpaCO: each rank its own draw
    if kind == "spaco":
        ref_grads, ref_loss, chunks = spaco_reference(copy.deepcopy(base), ids, labels, world, CHUNK, seed)
    else:
        ref_grads, ref_loss = reference(copy.deepcopy(base), ids, labels, world)
        chunks = SEQ // CHUNK
    model = copy.deepcopy(base)
    if kind in ("mst", "seco+mst"):
        seqwrap.apply_minisequence(model, mlp_chunks=4)
    engine = make_engine(model, stage)
    with count_ds_collectives() as counts:
        if kind == "mst":   # MsT alone runs inside the engine's own forward / backward
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
        else:
            step = (seqwrap.SpaCO(engine, chunk_size=CHUNK, rate=0.5, seed=seed) if kind == "spaco"
                    else seqwrap.SeCO(engine, chunk_size=CHUNK))
            out = step(ids, labels=labels)
            loss = out.loss
            assert out.backward_chunks == chunks, (out.backward_chunks, chunks)
    grads = full_grads(engine)
    engine.step()
    after = full_params(engine)
    expect = {n: start[n] - LR * ref_grads[n] for n in start}
    res = dict(grad=rel_err(grads, ref_grads), loss=abs(loss.item() - ref_loss.item()),
               params=rel_err(after, expect), counts=dict(counts), chunks=chunks,
               n_params=len(start), grad_dtype=str(next(iter(grads.values())).dtype))
    if kind == "seco" and stage == 3:
        res.update(second_step(rank, world, engine, after))
    return res


def second_step(rank, world, engine, params):
    """A second SeCO step on the same engine (the hooks put back, the parameters partitioned again):
    against full backprop at the parameters of the first step; then a plain engine forward (ZeRO-3's
    own hooks gather again) against the reference forward."""
    import seqwrap

    ids, labels = batch(rank + 7, seq=SEQ)
    ref_grads, ref_loss = reference(load(llama(), params), ids, labels, world)
    out = seqwrap.SeCO(engine, chunk_size=CHUNK)(ids, labels=labels)
    grads = full_grads(engine)
    with torch.no_grad():
        fwd = engine(input_ids=ids).logits
        ref_fwd = load(llama(), params)(input_ids=ids).logits
    engine.optimizer.zero_grad()
    try:
        seqwrap.SeCO(engine.module, chunk_size=CHUNK)
        refused = None
    except ValueError as e:
        refused = str(e)
    return dict(bare_module=refused, grad2=rel_err(grads, ref_grads), loss2=abs(out.loss.item() - ref_loss.item()),
                forward_after=((fwd - ref_fwd).norm() / ref_fwd.norm()).item())


CASES = [("seco", 3), ("seco", 2), ("seco", 1), ("spaco", 1), ("spaco", 3), ("spaco", 2), ("mst", 3), ("mst", 2), ("seco+mst", 3), ("seco+mst", 2)]


def cases(rank, world, todo):
    faulthandler.dump_traceback_later(150, exit=True)  # a hung collective dumps every stack
    try:
        _deepspeed_on_cpu(rank, world)
        return {key: run_case(rank, world, *key) for key in todo}
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def results():
    """Every case, on both ranks, in one 2-rank job: {case: [rank 0's result, rank 1's]}."""
    out = run_distributed(cases, WORLD, CASES, timeout_s=30)
    return {key: [r[key] for r in out] for key in CASES}


# DeepSpeed keeps ZeRO's gradient partitions and master weights in float32 (grad_dtype below), so the
# float64 model's gradients come back rounded to float32: 1e-6, where a gradient reduced per chunk, a
# chunk missed or the step's 1/world mean off would be off by O(1).
TOL = 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-zero{c[1]}")
def test_equal_to_single_process(results, case):
    for rank, r in enumerate(results[case]):
        assert r["grad_dtype"] == "torch.float32", r  # the rounding the tolerance is for
        assert r["grad"] < TOL, (rank, r)
        assert r["params"] < TOL, (rank, r)   # after engine.step(): one SGD step with the reference gradient
        assert r["loss"] < 1e-12 if case[0] != "mst" else r["loss"] < 1e-6, (rank, r)


def test_spaco_ranks_drew_differently(results):
    """The SpaCO cases ran different chunk selections on the two ranks (a draw per rank) and still
    gathered and reduced once: nothing in the ZeRO step depends on the chunks."""
    fingerprints = [r["chunks"] for r in results[("spaco", 3)]]
    assert fingerprints[0] != fingerprints[1], fingerprints


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "mst"], ids=lambda c: f"{c[0]}-zero{c[1]}")
def test_gathered_once_reduced_once(results, case):
    """ZeRO-3: one all-gather per parameter for the whole step (3 chunks: the hooks would gather each
    layer in pass 1 and again in every chunk's recompute and backward); ZeRO-2/3: one reduction (the
    tiny model fits one bucket), not one per chunk backward. Besides: the agreement's all-reduce
    (parallel/agreement.py)."""
    for r in results[case]:
        c = r["counts"]
        if case[1] == 3:
            assert c.get("all_gather_into_tensor") == r["n_params"], c
            assert c.get("reduce_scatter_tensor") == 1, c
        else:
            assert "all_gather_into_tensor" not in c, c
            assert c.get("all_reduce") == 1, c   # one reduction (the agreement goes round deepspeed.comm)


def test_second_step_and_plain_forward(results):
    for r in results[("seco", 3)]:
        assert r["grad2"] < TOL, r
        assert r["loss2"] < 1e-12, r
        assert r["forward_after"] < 1e-6, r


def test_bare_zero3_module_refused(results):
    """SeCO on engine.module (what a trainer that does not know DeepSpeed would pass) is refused by name."""
    for r in results[("seco", 3)]:
        assert r["bare_module"] is not None and "pass the DeepSpeedEngine itself" in r["bare_module"], r
