"""Ulysses sequence parallelism on an FSDP2 (fully_shard) model: what the chunked step changes.

Under Ulysses the P ranks of the sequence group each hold part of one sequence, so the gradient of the
whole sequence is the SUM of their gradients (plain Ulysses all-reduces them, grad_sync.reduce_step).
FSDP2's reduction instead AVERAGES over its mesh (reduce-scatter over the shard dimension, all-reduce
over the replicate dimension of an HSDP mesh). When the FSDP2 mesh contains the Ulysses group (the same
ranks, or a 2-D DeviceMesh of (data-parallel, sequence-parallel) ranks), the step multiplies its backward
by P and lets FSDP2 reduce: sum over the sequence ranks, mean over the data-parallel replicas, with FSDP2's
own all-gather and reduce-scatter once per group per step and no extra gradient all-reduce (only the
loss, one float64, is summed over the Ulysses group). A power-of-two P makes the factor exact.

Only the default FSDPSchedule() is supported with Ulysses: each data-parallel replica may hold a sequence
of another length, and the count-dependent schedules would need SpaCO's draw agreed across replicas
after the Ulysses group's label counts are known (a second agreement per step).

No transformers import here.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .fsdp import FSDPSchedule, FSDPStep


def mesh_ranks(model: nn.Module) -> set[int]:
    """Global ranks of the DeviceMeshes the FSDP2-sharded (DTensor) parameters of `model` live on."""
    from torch.distributed.tensor import DTensor

    ranks: set[int] = set()
    for p in model.parameters():
        if isinstance(p, DTensor):
            ranks.update(int(r) for r in p.device_mesh.mesh.flatten().tolist())
    return ranks


def ulysses_fsdp_factor(model: nn.Module, fsdp: FSDPStep, group, engine: str) -> int:
    """P, the factor on the step's backward (module docstring), after checking that FSDP2's reduction
    spans the Ulysses group; raises naming the problem otherwise."""
    if fsdp.schedule != FSDPSchedule():
        raise NotImplementedError(f"seqwrap.{engine}: under Ulysses sequence parallelism an FSDP2 model takes only "
                                  f"the default FSDPSchedule() (params='step', grads='step'), not {fsdp.schedule}")
    ulysses = set(dist.get_process_group_ranks(group))
    sharded = mesh_ranks(model)
    missing = sorted(ulysses - sharded)
    if missing:
        raise ValueError(f"seqwrap.{engine}: the FSDP2 mesh (ranks {sorted(sharded)}) does not contain the Ulysses "
                         f"ranks {missing}: FSDP2's reduction must sum the sequence ranks' gradients; shard over the "
                         "same ranks, or over a 2-D DeviceMesh (dp, sp) with fully_shard(model, mesh=mesh) (HSDP)")
    return dist.get_world_size(group)
