"""Gradient synchronisation for chunked engines (DistributedDataParallel, Ulysses groups).

A chunked step runs many backward passes (one per recomputed chunk). The
engine runs them all on the wrapped module, outside DDP's forward, so DDP's
reducer never fires; afterwards this module all-reduces the accumulated
gradients once (averaged over ranks, as DDP does), in flat buckets. It is
skipped inside `ddp.no_sync()` (gradient accumulation), exactly like DDP.
This works even when ranks run different numbers of chunk backwards (SpaCO).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_BUCKET_BYTES = 25 << 20


def sync_gradients(ddp: nn.Module) -> None:
    """All-reduce (mean) the .grad of every trainable parameter of ddp.module, once."""
    if not getattr(ddp, "require_backward_grad_sync", True):
        return
    group = getattr(ddp, "process_group", None)
    world = dist.get_world_size(group)
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    for p in params:  # every rank must contribute the same tensors
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in params:
        key = (p.grad.dtype, p.grad.device)
        groups = buckets.setdefault(key, [[]])
        if groups[-1] and sum(g.numel() * g.element_size() for g in groups[-1]) >= _BUCKET_BYTES:
            groups.append([])
        groups[-1].append(p.grad)
    for groups in buckets.values():
        for grads in groups:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset: offset + n].view_as(g))
                offset += n


def stash_grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Takes the gradients accumulated before a step aside (p.grad = None), so that only the
    step's own gradients are reduced afterwards (sum_step_grads puts them back)."""
    stash = []
    for p in params:
        stash.append(p.grad)
        p.grad = None
    return stash


def sum_step_grads(params: list[torch.Tensor], stash: list, group, loss_sum: torch.Tensor) -> torch.Tensor:
    """Sums the step's parameter gradients and `loss_sum` (0-d) over `group` in one flat float64
    all-reduce, then adds back the stashed gradients. Returns the summed loss_sum."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] + [loss_sum.reshape(1).to(torch.float64)])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p, old in zip(params, stash):
        g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = g if old is None else old + g
        offset += p.numel()
    return flat[-1].to(loss_sum.device)
