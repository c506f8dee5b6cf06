"""DeepSpeed ZeRO-2 / ZeRO-3 under SeCO, SpaCO and MsT, on 2 gloo ranks (CPU), in float64.

Reference: single-process full backprop of each rank's whole sequence (float64 loss), averaged over the
ranks (DeepSpeed's data-parallel mean); after engine.step() the parameters must equal one SGD step
from the same start with that gradient. Collectives are counted at DeepSpeed's communication backend
(deepspeed.comm's cdb, which every ZeRO collective goes through)."""
import collections
import contextlib
import copy
import datetime

import pytest
import torch
import torch.nn.functional as F

from .dist_utils import run_distributed

transformers = pytest.importorskip("transformers")
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed does not import here: the ZeRO tests need it")

WORLD = 2
LR = 0.1
_COUNTED = ("all_gather_into_tensor", "all_gather", "all_gather_coalesced", "reduce_scatter_tensor",
            "reduce_scatter", "all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "broadcast",
            "all_to_all_single")


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
    """Full backprop of this rank's sequence, gradients averaged over the ranks: {name: grad}, loss."""
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
            "zero_optimization": {"stage": stage}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def make_engine(model, stage):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    return engine


@contextlib.contextmanager
def count_ds_collectives():
    """Counts calls of DeepSpeed's communication backend methods inside the block, by name."""
    from deepspeed.comm import comm

    counts = collections.Counter()
    cdb = comm.cdb
    saved = {}
    for name in _COUNTED:
        fn = getattr(cdb, name, None)
        if fn is None:
            continue
        saved[name] = fn

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
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def rel_err(got, ref):
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def run_case(rank, world, kind, stage, chunk, seq):
    import seqwrap

    ids, labels = batch(rank, seq=seq)
    base = llama()
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref_grads, ref_loss = reference(copy.deepcopy(base), ids, labels, world)
    model = copy.deepcopy(base)
    if kind == "mst":
        seqwrap.apply_minisequence(model, mlp_chunks=4)
    engine = make_engine(model, stage)
    with count_ds_collectives() as counts:
        if kind == "mst":   # MsT runs inside the engine's own forward / backward
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
        else:
            cls = seqwrap.SpaCO if kind == "spaco" else seqwrap.SeCO
            extra = {"rate": 1.0, "seed": 0} if kind == "spaco" else {}
            res = cls(engine, chunk_size=chunk, **extra)(ids, labels=labels)
            loss = res.loss
    grads = full_grads(engine)
    engine.step()
    after = full_params(engine)
    expect = {n: start[n] - LR * ref_grads[n] for n in start}
    return dict(err=rel_err(grads, ref_grads), loss=abs(loss.item() - ref_loss.item()),
                step_err=rel_err({n: after[n] - start[n] for n in start}, {n: expect[n] - start[n] for n in start}),
                counts=dict(counts))


def cases(rank, world, todo):
    return {key: run_case(rank, world, *key) for key in todo}


def test_prototype():
    todo = [("seco", 3, 8, 24)]
    out = run_distributed(cases, WORLD, todo)
    print(out)
    for r in out:
        for k, v in r.items():
            assert v["err"] < 1e-10, (k, v)
