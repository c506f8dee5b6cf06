"""Ulysses sequence parallelism x FSDP2 (fully_shard), 2 and 4 gloo ranks, float64.

The model is both apply_ulysses-patched and fully_shard-ed: on the same ranks (every rank holds part of
one sequence and a shard of the parameters), and on a 2-D DeviceMesh (dp=2 x sp=2: HSDP, each data-parallel
replica its own sequence). The reference is single-process full backprop of each whole sequence (the mean
over the replicas on the 2-D mesh). One all-gather and one reduce-scatter per FSDP group per step with the
default schedule; the count-dependent schedules (grads="chunk", params="layer") exact too. FSDP2's own
divide factor makes its reduction sum the sequence ranks (parallel/ulysses_fsdp.py): MsT's plain
`loss.backward()` needs no scaling.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from .dist_utils import run_distributed

transformers = pytest.importorskip("transformers")

LAYERS = 2
GROUPS = LAYERS + 1  # the layers and the root


def model_f64():
    from .test_ulysses import tiny_model

    return tiny_model("llama")


def make_batch(seed, seq=24, b=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, seq), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = -100
    return {"input_ids": ids, "labels": labels}


def full_backprop(batch):
    """Single process, whole sequence, the loss formed in float64."""
    model = model_f64()
    logits = model(batch["input_ids"]).logits
    shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), reduction="sum") / (shift != -100).sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def spaco_single(batch, chunk):
    import seqwrap

    model = model_f64()
    out = seqwrap.SpaCO(model, chunk_size=chunk, rate=0.5, seed=3)(**batch)
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.backward_chunks


def shard(model, mesh=None, offload=False, mp=None):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {} if mesh is None else {"mesh": mesh}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if mp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp[0], reduce_dtype=mp[1])
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full_grads(model):
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def max_rel(got, ref):
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


CHUNK = 8


def engine_case(engine, group, mesh, batch, **opts):
    import seqwrap
    import seqwrap.parallel as sp
    from seqwrap.parallel import count_collectives

    model = model_f64()
    sp.apply_ulysses(model, group=group)
    shard(model, mesh=mesh, offload=opts.pop("offload", False), mp=opts.pop("mp", None))
    cls = seqwrap.SpaCO if engine == "spaco" else seqwrap.SeCO
    kw = dict(rate=0.5, seed=3) if engine == "spaco" else {}
    import warnings

    from seqwrap.parallel import FSDPSchedule

    schedule = opts.pop("schedule", None)
    eng = cls(model, chunk_size=CHUNK, fsdp=None if schedule is None else FSDPSchedule(**schedule), **kw)
    with count_collectives() as counts, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = eng(**sp.shard_batch(batch, group, chunk_size=CHUNK))
    return dict(loss=out.loss.item(), grads=full_grads(model), counts=counts, chunks=out.backward_chunks,
                warnings=[str(w.message) for w in caught])


def mst_case(group, batch, *, shard_first=False):
    """MsT (mini-sequence MLP and loss) under Ulysses x FSDP2, the user's plain loss.backward()."""
    import seqwrap
    import seqwrap.parallel as sp
    import torch.distributed as dist

    model = model_f64()
    seqwrap.apply_minisequence(model, mlp_chunks=2)
    if shard_first:
        shard(model)
    sp.apply_ulysses(model, group=group)
    if not shard_first:
        shard(model)
    out = model(**sp.shard_batch(batch, group))
    out.loss.backward()  # no scaling: FSDP2's divide factor was set at the forward
    total = out.loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = full_grads(model)
    sp.remove_ulysses(model)
    restored = [g.gradient_divide_factor for m in model.modules() if hasattr(m, "_get_fsdp_state")
                for g in m._get_fsdp_state()._fsdp_param_groups]
    return dict(loss=total.item(), grads=grads, restored=restored)


def user_factor_case(group):
    """A gradient divide factor the user set is not overwritten silently: refused, named."""
    import seqwrap
    import seqwrap.parallel as sp

    model = model_f64()
    sp.apply_ulysses(model, group=group)
    shard(model)
    model.set_gradient_divide_factor(3.0)
    try:
        seqwrap.SeCO(model, chunk_size=CHUNK)
    except ValueError as e:
        return str(e)
    return None


def same_ranks_worker(rank, world):
    torch.set_num_threads(1)
    batch = make_batch(1)
    out = {"seco": engine_case("seco", None, None, batch), "spaco": engine_case("spaco", None, None, batch)}
    if world == 2:
        out["mp_offload"] = engine_case("seco", None, None, batch, offload=True, mp=(torch.float32, torch.float64))
        # float32 reduction: FSDP2 would use PREMUL_SUM for the divide factor (gloo lacks it); forced to SUM
        out["mp32"] = engine_case("seco", None, None, batch, mp=(torch.float32, torch.float32))
        out["mst"] = mst_case(None, batch)
        out["mst_shard_first"] = mst_case(None, batch, shard_first=True)
        out["seco_chunk_grads"] = engine_case("seco", None, None, batch, schedule=dict(grads="chunk"))
        out["seco_layer_params"] = engine_case("seco", None, None, batch, schedule=dict(params="layer"))
        out["spaco_chunk_grads"] = engine_case("spaco", None, None, batch, schedule=dict(grads="chunk"))
        out["user_factor"] = user_factor_case(None)
    return out


def mesh_worker(rank, world):
    """dp=2 x sp=2: replica d (ranks 2d, 2d+1) trains on sequence d; HSDP replicates over dp, shards over sp."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    group = mesh["sp"].get_group()
    replica = mesh.get_local_rank("dp")
    out = engine_case("seco", group, mesh, make_batch(1 + replica, seq=24 if replica == 0 else 16))
    out["replica"] = replica
    # grads="chunk" with 3 chunks on replica 0, 2 on replica 1: the agreement makes this step use the default
    out["chunk_grads"] = engine_case("seco", group, mesh, make_batch(1 + replica, seq=24 if replica == 0 else 16),
                                     schedule=dict(grads="chunk"))
    # sharded over the dp dimension only, FSDP2 would never sum the sequence ranks' gradients: refused
    import seqwrap
    import seqwrap.parallel as sp

    model = model_f64()
    sp.apply_ulysses(model, group=group)
    shard(model, mesh=mesh["dp"])
    try:
        seqwrap.SeCO(model, chunk_size=CHUNK)
        out["dp_only"] = None
    except ValueError as e:
        out["dp_only"] = str(e)
    # SpaCO's draw under Ulysses is made after the agreement: per-chunk collectives on 2 replicas refused
    from seqwrap.parallel import FSDPSchedule

    model = model_f64()
    sp.apply_ulysses(model, group=group)
    shard(model, mesh=mesh)
    try:
        seqwrap.SpaCO(model, chunk_size=CHUNK, rate=0.5, fsdp=FSDPSchedule(grads="chunk"))
        out["spaco_refusal"] = None
    except NotImplementedError as e:
        out["spaco_refusal"] = str(e)
    return out


@functools.lru_cache(maxsize=None)
def same_ranks(world):
    return run_distributed(same_ranks_worker, world, timeout_s=30)


@pytest.mark.parametrize("world", [2, 4])
def test_seco_and_spaco_on_ulysses_fsdp2_same_ranks_equal_single_process(world):
    batch = make_batch(1)
    ref_loss, ref = full_backprop(batch)
    sp_loss, sp_ref, sp_chunks = spaco_single(batch, CHUNK)
    assert 0 < sp_chunks < 3  # a real sparse draw
    for rank, r in enumerate(same_ranks(world)):
        assert max_rel(r["seco"]["grads"], ref) < 1e-10, rank
        assert abs(r["seco"]["loss"] - ref_loss) < 1e-10 * ref_loss
        assert max_rel(r["spaco"]["grads"], sp_ref) < 1e-10, rank
        assert r["spaco"]["chunks"] == sp_chunks and abs(r["spaco"]["loss"] - sp_loss) < 1e-10 * sp_loss
        for case in ("seco", "spaco"):
            c = r[case]["counts"]
            assert (c.all_gathers, c.reduce_scatters) == (GROUPS, GROUPS), (case, c)


def test_mixed_precision_offload_and_mst_on_ulysses_fsdp2():
    batch = make_batch(1)
    ref_loss, ref = full_backprop(batch)
    for rank, r in enumerate(same_ranks(2)):
        # float32 parameters and compute (MixedPrecisionPolicy), float64 / float32 reduction, CPU offload:
        # float32 rounding of a float64 reference (measured ~1e-7)
        for case in ("mp_offload", "mp32"):
            assert max_rel(r[case]["grads"], ref) < 2e-5, (rank, case)
            c = r[case]["counts"]
            assert (c.all_gathers, c.reduce_scatters) == (GROUPS, GROUPS), c
        for case in ("mst", "mst_shard_first"):  # plain loss.backward(), no user-side scaling
            assert max_rel(r[case]["grads"], ref) < 1e-10, (rank, case)
            assert abs(r[case]["loss"] - ref_loss) < 1e-6 * ref_loss  # HF's loss upcasts the logits to float32
            assert set(r[case]["restored"]) == {None}  # remove_ulysses gave FSDP2 its own mean back
        assert "gradient divide factor set ([3.0])" in r["user_factor"]


def test_count_dependent_schedules_on_ulysses_fsdp2_same_ranks_are_exact():
    batch = make_batch(1)
    _, ref = full_backprop(batch)
    _, sp_ref, sp_chunks = spaco_single(batch, CHUNK)
    chunks = 24 // CHUNK
    for rank, r in enumerate(same_ranks(2)):
        for case, want in (("seco_chunk_grads", ref), ("seco_layer_params", ref), ("spaco_chunk_grads", sp_ref)):
            assert max_rel(r[case]["grads"], want) < 1e-10, (rank, case)
            assert r[case]["warnings"] == [], (case, r[case]["warnings"])  # the user's schedule ran
        c = r["seco_chunk_grads"]["counts"]
        assert (c.all_gathers, c.reduce_scatters) == (GROUPS, GROUPS * chunks), c  # one per group per chunk
        c = r["spaco_chunk_grads"]["counts"]
        assert c.reduce_scatters == GROUPS * sp_chunks, c
        c = r["seco_layer_params"]["counts"]
        assert c.all_gathers > GROUPS * chunks and c.reduce_scatters == GROUPS, c  # per-layer gathers


def test_seco_on_a_2d_mesh_equals_the_mean_of_the_replicas_full_backprop():
    refs = [full_backprop(make_batch(1 + d, seq=24 if d == 0 else 16)) for d in (0, 1)]
    mean = {n: (refs[0][1][n] + refs[1][1][n]) / 2 for n in refs[0][1]}
    for rank, r in enumerate(run_distributed(mesh_worker, 4, timeout_s=30)):
        assert max_rel(r["grads"], mean) < 1e-10, rank
        assert abs(r["loss"] - refs[r["replica"]][0]) < 1e-10 * refs[r["replica"]][0]
        c = r["counts"]
        assert (c.all_gathers, c.reduce_scatters) == (GROUPS, GROUPS), c
        assert "does not contain the Ulysses ranks" in r["dp_only"]
        # uneven replicas under grads="chunk": exact, on the default schedule for this step, said so
        assert max_rel(r["chunk_grads"]["grads"], mean) < 1e-10, rank
        c = r["chunk_grads"]["counts"]
        assert (c.all_gathers, c.reduce_scatters) == (GROUPS, GROUPS), c
        assert any("2 to 3 chunks" in w for w in r["chunk_grads"]["warnings"]), r["chunk_grads"]["warnings"]
        assert "the draw of the 2 data-parallel replicas" in r["spaco_refusal"]
