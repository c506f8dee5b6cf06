"""Ulysses sequence parallelism on an FSDP2 (fully_shard) model: FSDP2's reduction sums the sequence ranks.

Under Ulysses the P ranks of the sequence group each hold part of one sequence, so the gradient of the
whole sequence is the SUM of their gradients (plain Ulysses all-reduces them, grad_sync.reduce_step).
FSDP2's reduction instead AVERAGES over its mesh: it divides the summed gradients by the mesh size N
(reduce-scatter over the shard dimension, all-reduce over the replicate dimension of an HSDP mesh). When
the FSDP2 mesh is made of whole Ulysses groups (the same ranks, a 2-D DeviceMesh of (data-parallel,
sequence-parallel) ranks, or a 1-D mesh over several Ulysses groups), the right divisor is the number of
data-parallel replicas, N / P: sum over the sequence ranks, mean over the replicas.

So `configure_reduction` sets FSDP2's own gradient divide factor (FSDPModule.set_gradient_divide_factor)
to N / P on every FSDP2 module of the model, once; nothing scales the backward, and whatever runs the
backward gets the right gradient:
  - SeCO / SpaCO call it when they are built (seco.py), and then drive FSDP2 with one all-gather and one
    reduce-scatter per group per step (fsdp.FSDPStep);
  - MsT and plain Ulysses training (`model(**shard).loss.backward()`) get it from apply_ulysses' forward
    pre-hook on the model (seqwrap/hf/ulysses.py), at the first forward, whichever of apply_ulysses and
    fully_shard came first.
It also sets FSDPModule.set_force_sum_reduction_for_comms(True): with a divide factor that is not the
reduce-scatter group's size, FSDP2 would otherwise reduce float32 / bfloat16 with ReduceOp.PREMUL_SUM,
which gloo does not implement; forced to SUM it divides the reduced shard afterwards (one division of
1/N of the gradients). remove_ulysses restores both settings (`restore_reduction`).

FSDPSchedule under Ulysses: the default (one all-gather, one reduce-scatter per group per step) always.
The count-dependent schedules (params="layer", grads="chunk") issue collectives per chunk: the ranks of a
Ulysses group always hold the same chunks (shard_batch splits each chunk over them, and SpaCO's draw is
rank 0's), and the step's agreement (parallel/agreement.py) makes data-parallel replicas with different
chunk counts fall back to the default for that step. What the agreement cannot see under Ulysses is
SpaCO's draw (it is made after the agreement, from the group's summed label counts), which may differ
between data-parallel replicas: SpaCO with a count-dependent schedule is refused when the FSDP2 mesh holds
more than one Ulysses group.

No transformers import here.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .fsdp import FSDPSchedule, FSDPStep, fsdp_modules

_MARK = "_seqwrap_ulysses_reduction"   # on an FSDP2 module: (factor, user's factor, user's force_sum)


def mesh_ranks(model: nn.Module) -> set[int]:
    """Global ranks of the DeviceMeshes the FSDP2-sharded (DTensor) parameters of `model` live on."""
    from torch.distributed.tensor import DTensor

    ranks: set[int] = set()
    for p in model.parameters():
        if isinstance(p, DTensor):
            ranks.update(int(r) for r in p.device_mesh.mesh.flatten().tolist())
    return ranks


def replicas(model: nn.Module, group, engine: str) -> int:
    """N / P: how many Ulysses groups the FSDP2 mesh of `model` holds (the divide factor); raises naming
    the problem when the mesh does not contain the Ulysses ranks."""
    ulysses = set(dist.get_process_group_ranks(group))
    sharded = mesh_ranks(model)
    missing = sorted(ulysses - sharded)
    if missing:
        raise ValueError(f"seqwrap.{engine}: the FSDP2 mesh (ranks {sorted(sharded)}) does not contain the Ulysses "
                         f"ranks {missing}: FSDP2's reduction must sum the sequence ranks' gradients; shard over the "
                         "same ranks, or over a 2-D DeviceMesh (dp, sp) with fully_shard(model, mesh=mesh) (HSDP)")
    if len(sharded) % len(ulysses):
        raise ValueError(f"seqwrap.{engine}: the FSDP2 mesh has {len(sharded)} ranks, not a multiple of the "
                         f"{len(ulysses)} Ulysses ranks: it must be made of whole Ulysses groups")
    return len(sharded) // len(ulysses)


def configure_reduction(model: nn.Module, group, engine: str) -> int:
    """Sets FSDP2's gradient divide factor on every FSDP2 module of `model` to the number of data-parallel
    replicas (module docstring); idempotent. Returns the factor (0 when `model` has no FSDP2 module).
    Raises when the mesh does not fit the Ulysses group, or when the user set another divide factor."""
    modules = fsdp_modules(model)
    if not modules:
        return 0
    factor = replicas(model, group, engine)
    for m in modules:
        groups = m._get_fsdp_state()._fsdp_param_groups
        mark = getattr(m, _MARK, None)
        if mark is not None:
            if mark[0] != factor:
                raise ValueError(f"seqwrap.{engine}: the FSDP2 divide factor was set for {mark[0]} replicas, the mesh "
                                 f"now holds {factor}")
            continue
        user = {g.gradient_divide_factor for g in groups}
        if user - {None}:
            raise ValueError(f"seqwrap.{engine}: {type(m).__name__} has a gradient divide factor set "
                             f"({sorted(user - {None})}); under Ulysses seqwrap sets it to the number of data-parallel "
                             f"replicas ({factor}) so that FSDP2 sums the sequence ranks' gradients: leave it unset")
        forced = [g.force_sum_reduction_for_comms for g in groups]
        m.set_gradient_divide_factor(float(factor))
        m.set_force_sum_reduction_for_comms(True)
        setattr(m, _MARK, (factor, forced))
    return factor


def restore_reduction(model: nn.Module) -> None:
    """Undoes configure_reduction on every FSDP2 module of `model` (FSDP2's own mean comes back)."""
    for m in fsdp_modules(model):
        mark = getattr(m, _MARK, None)
        if mark is None:
            continue
        for g, forced in zip(m._get_fsdp_state()._fsdp_param_groups, mark[1]):
            g.gradient_divide_factor = None
            g.force_sum_reduction_for_comms = forced
        delattr(m, _MARK)


def check_schedule(model: nn.Module, fsdp: FSDPStep, group, engine: str, *, sampled: bool) -> None:
    """Refuses the one combination the step's agreement cannot keep in step (module docstring): a
    count-dependent FSDPSchedule for a sampling engine (SpaCO) on a mesh of several Ulysses groups."""
    if not (sampled and fsdp.schedule.count_dependent):
        return
    n = replicas(model, group, engine)
    if n > 1:
        raise NotImplementedError(
            f"seqwrap.{engine}: {fsdp.schedule} issues collectives per recomputed chunk, and under Ulysses the draw "
            f"of the {n} data-parallel replicas of this FSDP2 mesh is made after the ranks agree, so their chunks "
            f"could differ and the ranks hang: use the default FSDPSchedule() (one all-gather and one reduce-scatter "
            "per group per step), or shard over the Ulysses ranks only")


def ulysses_fsdp_setup(model: nn.Module, fsdp: FSDPStep, group, engine: str, *, sampled: bool) -> None:
    """What a chunked engine does when it is built on a Ulysses x FSDP2 model: check the schedule, set the
    divide factor (its backward then needs no scaling)."""
    check_schedule(model, fsdp, group, engine, sampled=sampled)
    configure_reduction(model, group, engine)


__all__ = ["FSDPSchedule", "configure_reduction", "restore_reduction", "ulysses_fsdp_setup", "mesh_ranks"]
