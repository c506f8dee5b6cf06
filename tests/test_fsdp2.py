"""SeCO / SpaCO / MsT / AdjointSharding on FSDP2 (fully_shard) models, 2 gloo ranks on CPU.

Every rank trains on its own batch (data parallel); the reference is the same FSDP2 model trained
with plain full backprop (FSDP2's own hooks, one forward and one backward). Gradients are compared
after FSDP's reduce-scatter (sharded DTensor grads, gathered with full_tensor()), in float64.
The collectives each step issues are counted (seqwrap.parallel.count_collectives).
"""
import pytest
import torch
import torch.nn.functional as F

from .dist_utils import run_distributed

transformers = pytest.importorskip("transformers")

WORLD = 2
LAYERS = 2


# -- models and data (the same on every rank; the batch differs per rank) -------------------------------
def llama():
    from .hf_tiny import tiny_model

    return tiny_model("llama", layers=LAYERS)


def lora(model):
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False)  # random B: every LoRA weight gets a gradient
    torch.manual_seed(3)
    return peft.get_peft_model(model, cfg)


def shard(model, offload=False, mp=None):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
    if mp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp[0], reduce_dtype=mp[1])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = inner.model.layers if hasattr(inner, "model") else inner.backbone.layers
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def batch(rank, seq=24, b=2, vocab=61):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, vocab, (b, seq), generator=g)
    labels = ids.clone()
    labels[0, 2:5] = -100
    return ids, labels


def plain_step(model, ids, labels):
    """Plain FSDP2 backprop; the loss formed in float64 from the logits (HF's loss casts to float32)."""
    logits = model(input_ids=ids).logits
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1).double(), shift.flatten(), reduction="sum") / (shift != -100).sum()
    loss.backward()
    return loss.detach()


def full_grads(model):
    """name -> the full (gathered) gradient; collective: every rank calls it in the same order."""
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(got, ref):
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def all_sharded(model):
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in model.parameters())


# -- SeCO / SpaCO against plain FSDP2 --------------------------------------------------------------------
def engine_cases(rank, world, cases):
    import seqwrap
    from seqwrap.parallel import FSDPSchedule, count_collectives

    out = {}
    for name, kind, opts in cases:
        offload, mp, use_lora, schedule = (opts.get(k) for k in ("offload", "mp", "lora", "schedule"))
        ids, labels = batch(rank)

        def build():
            m = llama()
            return shard(lora(m) if use_lora else m, offload=offload, mp=mp)

        ref = build()
        with count_collectives() as plain:
            ref_loss = plain_step(ref, ids, labels)
        ref_grads = full_grads(ref)
        model = build()
        engine_cls = seqwrap.SpaCO if kind == "spaco" else seqwrap.SeCO
        extra = {"rate": 1.0, "seed": 0} if kind == "spaco" else {}
        engine = engine_cls(model, chunk_size=8, fsdp=None if schedule is None else FSDPSchedule(*schedule), **extra)
        with count_collectives() as counts:
            res = engine(ids, labels=labels)
        out[name] = dict(err=rel_err(full_grads(model), ref_grads), loss=abs(res.loss.item() - ref_loss.item()),
                         plain=plain, counts=counts, sharded=all_sharded(model),
                         grad_device={p.grad.device.type for p in model.parameters() if p.grad is not None})
    return out


F64_CASES = [
    ("seco", "seco", {}),
    ("spaco_rate1", "spaco", {}),
    ("seco_offload", "seco", {"offload": True}),
    ("seco_lora", "seco", {"lora": True}),
    ("seco_lora_offload", "seco", {"lora": True, "offload": True}),
]


MP = (torch.float32, torch.float64)
MP_CASES = [("mp", "seco", {"mp": MP}), ("mp_offload_lora", "seco", {"mp": MP, "offload": True, "lora": True})]
SCHEDULES = [("layer", "step"), ("step", "chunk"), ("layer", "chunk")]
SCHEDULE_CASES = [("/".join(s), "seco", {"schedule": s}) for s in SCHEDULES]


@pytest.fixture(scope="module")
def f64_results():
    """Every engine case in one pair of processes (spawning costs more than the cases)."""
    return run_distributed(engine_cases, WORLD, F64_CASES + MP_CASES + SCHEDULE_CASES)


@pytest.mark.parametrize("name", [c[0] for c in F64_CASES])
def test_engine_on_fsdp2_equals_plain_fsdp2_backprop(f64_results, name):
    for rank in range(WORLD):
        r = f64_results[rank][name]
        assert r["err"] < 1e-10, (rank, name, r["err"])
        assert r["loss"] < 1e-12, (rank, name, r["loss"])
        assert r["sharded"], "parameters must be resharded after the step"
        assert r["grad_device"] == {"cpu"}


@pytest.mark.parametrize("name", [c[0] for c in F64_CASES])
def test_default_schedule_gathers_and_reduces_each_group_once(f64_results, name):
    """Default schedule: one all-gather per FSDP group (layers + root) per step, and one reduce-scatter per
    group with gradients (under LoRA the root's embeddings / head are frozen): fewer all-gathers than
    plain FSDP2 backprop (2 per layer + the root) and as many reduce-scatters; plus the one tiny
    all-reduce in which the ranks agree on the step."""
    lora_case = "lora" in name
    groups = LAYERS + 1
    for rank in range(WORLD):
        r = f64_results[rank][name]
        c, plain = r["counts"], r["plain"]
        assert (plain.all_gathers, plain.reduce_scatters) == (2 * LAYERS + 1, LAYERS if lora_case else groups)
        assert c.all_gathers == groups, c
        assert c.reduce_scatters == plain.reduce_scatters, (c, plain)
        assert c.reduce_scatter_bytes == plain.reduce_scatter_bytes
        assert c.all_gather_bytes < plain.all_gather_bytes
        assert (c.all_reduces, c.all_reduce_bytes) == (1, (3 * WORLD + 4) * 8)  # the ranks' agreement (agreement.py)


def test_mixed_precision_equals_plain_fsdp2_with_the_same_policy(f64_results):
    """MixedPrecisionPolicy(param_dtype=float32, reduce_dtype=float64) on a float64 model: the unsharded
    parameters and the compute are float32, so the tolerance is float32's."""
    results = f64_results
    for rank in range(WORLD):
        for name in ("mp", "mp_offload_lora"):
            r = results[rank][name]
            assert r["err"] < 2e-5, (rank, name, r["err"])
            assert r["counts"].all_gathers == LAYERS + 1
            assert r["counts"].reduce_scatters == r["plain"].reduce_scatters


def test_other_schedules_equal_plain_backprop_and_their_counts(f64_results):
    """24 tokens in chunks of 8: K = 3 chunk backwards, pass 1 runs the first 2 chunks.
    params="layer": the root is gathered once; each layer once per pass-1 forward and twice per chunk
    backward (forward + backward), plus one prefetch FSDP aims at the last pass-1 record in the first
    backward (it is discarded). grads="chunk": one reduce-scatter per group per chunk backward."""
    results = f64_results
    K, P1 = 3, 2
    for rank in range(WORLD):
        for params, grads in SCHEDULES:
            r = results[rank][f"{params}/{grads}"]
            assert r["err"] < 1e-10, (rank, params, grads, r["err"])
            gathers = LAYERS + 1 if params == "step" else 1 + LAYERS * (P1 + 2 * K) + 1
            reduces = (LAYERS + 1) * (K if grads == "chunk" else 1)
            assert (r["counts"].all_gathers, r["counts"].reduce_scatters) == (gathers, reduces), r["counts"]
            assert r["sharded"]


# -- accumulation, no_sync and a failed step ----------------------------------------------------------
class Boom(RuntimeError):
    pass


def accumulation_case(rank, world):
    import seqwrap
    from seqwrap.parallel import count_collectives

    (ids1, lab1), (ids2, lab2) = batch(rank), batch(rank + 10)
    ref = shard(llama())
    plain_step(ref, ids1, lab1)
    plain_step(ref, ids2, lab2)
    ref_grads = full_grads(ref)

    model = shard(llama())
    engine = seqwrap.SeCO(model, chunk_size=8)
    # micro-batch 1 without gradient sync (as accelerate's no_sync does), micro-batch 2 with it
    model.set_requires_gradient_sync(False)
    with count_collectives() as nosync:
        engine(ids1, labels=lab1)
    no_grad_after_nosync = all(p.grad is None for p in model.parameters())
    model.set_requires_gradient_sync(True)
    with count_collectives() as synced:
        engine(ids2, labels=lab2)
    err_accum = rel_err(full_grads(model), ref_grads)

    # a step that fails in the middle of pass 2 leaves the sharded gradients as they were
    before = full_grads(model)
    layer = model.model.layers[1]
    calls = {"n": 0}

    def fail(module, args, output):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                raise Boom("injected")

    handle = layer.register_forward_hook(fail)
    try:
        engine(ids1, labels=lab1)
        raised = False
    except Boom:
        raised = True
    handle.remove()
    state_ok = all_sharded(model)
    err_after_failure = rel_err(full_grads(model), before)
    unsharded_clean = all(getattr(fp, "_unsharded_param", None) is None or fp._unsharded_param.grad is None
                          for m in model.modules() if hasattr(m, "_get_fsdp_state")
                          for g in m._get_fsdp_state()._fsdp_param_groups for fp in g.fsdp_params)
    # and the next step is right again: grads = before + that step's
    engine(ids1, labels=lab1)
    ref2 = shard(llama())
    plain_step(ref2, ids1, lab1)
    step_grads = full_grads(ref2)
    expect = {n: before[n] + step_grads[n] for n in before}
    err_next = rel_err(full_grads(model), expect)
    return dict(nosync=nosync, synced=synced, no_grad_after_nosync=no_grad_after_nosync, err_accum=err_accum,
                raised=raised, state_ok=state_ok, err_after_failure=err_after_failure,
                unsharded_clean=unsharded_clean, err_next=err_next)


def test_accumulation_no_sync_and_failed_step():
    for r in run_distributed(accumulation_case, WORLD):
        assert r["nosync"].reduce_scatters == 0 and r["no_grad_after_nosync"], r["nosync"]
        assert r["nosync"].all_gathers == LAYERS + 1
        # the synced step reduce-scatters the gradients of both micro-batches, once per group
        assert r["synced"].reduce_scatters == LAYERS + 1
        assert r["err_accum"] < 1e-10, r["err_accum"]
        assert r["raised"]
        assert r["state_ok"], "a failed step must leave the parameters resharded"
        assert r["err_after_failure"] == 0.0
        assert r["unsharded_clean"], "a failed step must not leave gradients on the unsharded parameters"
        assert r["err_next"] < 1e-10, r["err_next"]


# -- MsT ---------------------------------------------------------------------------------------------
def mst_case(rank, world):
    import seqwrap
    from seqwrap.parallel import count_collectives

    ids, labels = batch(rank, seq=40)
    ref = shard(llama())
    with count_collectives() as plain:
        ref_loss = plain_step(ref, ids, labels)
    ref_grads = full_grads(ref)
    model = llama()
    seqwrap.apply_minisequence(model, mlp_chunks=4)
    shard(model)
    with count_collectives() as counts:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    return dict(err=rel_err(full_grads(model), ref_grads), loss=abs(out.loss.item() - ref_loss.item()),
                logits=out.logits, plain=plain, counts=counts)


def test_minisequence_on_fsdp2_equals_plain_fsdp2():
    """MsT runs inside FSDP2's own forward/backward: same gradients, same collectives."""
    for r in run_distributed(mst_case, WORLD):
        assert r["err"] < 1e-10, r["err"]
        assert r["loss"] < 1e-12
        assert r["logits"] is None
        assert (r["counts"].all_gathers, r["counts"].reduce_scatters) == \
            (r["plain"].all_gathers, r["plain"].reduce_scatters) == (2 * LAYERS + 1, LAYERS + 1)


# -- AdjointSharding (HF Mamba) --------------------------------------------------------------------------
def adjoint_case(rank, world, offload):
    import seqwrap
    from seqwrap.parallel import count_collectives

    from .mamba_utils import tiny_mamba

    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, 50, (2, 20), generator=g)
    ref = shard(tiny_mamba(), offload=offload)
    with count_collectives() as plain:
        ref(ids, labels=ids).loss.backward()
    ref_grads = full_grads(ref)
    model = shard(tiny_mamba(), offload=offload)
    engine = seqwrap.AdjointSharding(model, chunk_size=6)
    with count_collectives() as counts:
        engine(ids)
    return dict(err=rel_err(full_grads(model), ref_grads), plain=plain, counts=counts, sharded=all_sharded(model))


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "cpu_offload"])
def test_adjoint_sharding_on_fsdp2_equals_plain_fsdp2(offload):
    for r in run_distributed(adjoint_case, WORLD, offload):
        assert r["err"] < 1e-10, r["err"]
        assert r["sharded"]
        assert r["counts"].all_gathers == LAYERS + 1 < r["plain"].all_gathers
        assert r["counts"].reduce_scatters == r["plain"].reduce_scatters == LAYERS + 1


# -- refusals (one process) ----------------------------------------------------------------------------
def refusal_case(rank, world):
    import seqwrap
    from seqwrap.parallel import FSDPSchedule
    from torch.distributed.fsdp import fully_shard

    from .mamba_utils import tiny_mamba

    msgs = {}
    model = llama()
    for layer in model.model.layers:
        fully_shard(layer)     # no root
    try:
        seqwrap.SeCO(model, chunk_size=8)
    except ValueError as e:
        msgs["no_root"] = str(e)
    try:
        seqwrap.SeCO(llama(), chunk_size=8, fsdp=FSDPSchedule())
    except ValueError as e:
        msgs["not_sharded"] = str(e)
    try:
        seqwrap.AdjointSharding(shard(tiny_mamba()), chunk_size=6, fsdp=FSDPSchedule(params="layer"))
    except ValueError as e:
        msgs["adjoint_layer"] = str(e)
    try:
        FSDPSchedule(params="always")
    except ValueError as e:
        msgs["bad_schedule"] = str(e)
    from seqwrap.parallel.fsdp import check_internals

    sharded = shard(llama())
    check_internals(sharded._get_fsdp_state(), "SeCO")   # this torch has every internal the step uses
    state = sharded.model.layers[0]._get_fsdp_state()
    group = state._fsdp_param_groups[0]
    del group.reduce_grads                               # as if a torch release renamed it
    try:
        check_internals(state, "SeCO")
    except RuntimeError as e:
        msgs["internals"] = str(e)
    return msgs


def test_refusals_name_the_problem():
    msgs = run_distributed(refusal_case, 1)[0]
    assert "common root" in msgs["no_root"]
    assert "no FSDP2" in msgs["not_sharded"]
    assert "params='step'" in msgs["adjoint_layer"]
    assert "params must be one of" in msgs["bad_schedule"]
    assert "FSDPParamGroup.reduce_grads" in msgs["internals"]
