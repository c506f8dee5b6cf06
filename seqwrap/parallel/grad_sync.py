"""Gradient synchronisation for the chunked engines and sequence parallelism: one flat all-reduce.

A chunked step runs many backward passes (one per recomputed chunk) on the wrapped module, outside
DDP's forward, so DDP's reducer never fires; the step's gradients are all-reduced once afterwards.
Every reduction in seqwrap goes through `all_reduce_flat`:

  sync_ddp_gradients(ddp)     DDP semantics: mean over ranks, skipped inside ddp.no_sync(), buckets of
                              25 MiB per (dtype, device); works when ranks ran different chunk counts.
  allreduce_gradients(model)  sum over a group (plain Ulysses training loop), per (dtype, device).
  stash_grads / reduce_step / unstash_grads
                              a step whose ranks each hold part of one sequence (Ulysses under SeCO,
                              distributed AdjointSharding): gradients accumulated before the step are
                              set aside, the step's gradients and its loss sum are summed in one float64
                              buffer, then the old gradients are added back.
  keep_grads / rollback_grads a single-rank step accumulating straight into .grad: what a failed step
                              needs to put .grad back bitwise, at most one copy of the gradients (none
                              when .grad starts None or all zeros).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_BUCKET_BYTES = 25 << 20


def all_reduce_flat(tensors: list[torch.Tensor], group, *, average: bool = False, dtype: torch.dtype | None = None,
                    bucket_bytes: int | None = None) -> None:
    """In place: each tensor becomes its sum (mean with average=True) over `group`.

    Tensors are packed per (dtype, device) into flat buffers (of at most bucket_bytes each, when
    given), reduced in `dtype` (default: their own) and copied back."""
    if not tensors:
        return
    world = dist.get_world_size(group)
    by_kind: dict[tuple, list[list[torch.Tensor]]] = {}
    for t in tensors:
        buckets = by_kind.setdefault((t.dtype, t.device), [[]])
        if bucket_bytes is not None and buckets[-1] and \
                sum(x.numel() * x.element_size() for x in buckets[-1]) >= bucket_bytes:
            buckets.append([])
        buckets[-1].append(t)
    for buckets in by_kind.values():
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in bucket])
            dist.all_reduce(flat, group=group)
            if average:
                flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def sync_ddp_gradients(ddp: nn.Module) -> None:
    """All-reduce (mean) the .grad of every trainable parameter of ddp.module, once (as DDP would)."""
    if not getattr(ddp, "require_backward_grad_sync", True):
        return
    params = _trainable(ddp.module)
    for p in params:  # every rank must contribute the same tensors
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_flat([p.grad for p in params], getattr(ddp, "process_group", None), average=True,
                    bucket_bytes=_BUCKET_BYTES)


def allreduce_gradients(model: nn.Module, group=None) -> None:
    """Sums every parameter gradient of `model` over the group (default: the world)."""
    group = group or dist.group.WORLD
    all_reduce_flat([p.grad for p in model.parameters() if p.grad is not None], group)


def stash_grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Takes the gradients accumulated before a step aside (p.grad = None)."""
    stash = []
    for p in params:
        stash.append(p.grad)
        p.grad = None
    return stash


def reduce_step(tensors: list[torch.Tensor], group, loss_sum: torch.Tensor) -> torch.Tensor:
    """Sums the .grad of `tensors` (zeros where None) and `loss_sum` (0-d) over `group` in one float64
    all-reduce; each tensor's .grad becomes the sum. Returns the summed loss_sum (float64)."""
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads] + [loss_sum.reshape(1).to(torch.float64)])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.grad = flat[offset:offset + t.numel()].view_as(t).to(t.dtype)
        offset += t.numel()
    return flat[-1].to(loss_sum.device)


def unstash_grads(params: list[torch.Tensor], stash: list[torch.Tensor | None]) -> None:
    """Adds the step's gradients into the ones set aside by stash_grads (in place: p.grad keeps
    being the tensor it was before the step, as with plain accumulation)."""
    for p, old in zip(params, stash):
        if old is not None:
            if p.grad is not None:
                old.add_(p.grad)
            p.grad = old


def restore_grads(params: list[torch.Tensor], stash: list[torch.Tensor | None]) -> None:
    """A failed step: the gradients go back to what they were before it."""
    for p, old in zip(params, stash):
        p.grad = old


class _Kept:
    """What rollback_grads needs for one parameter: grad, the tensor .grad was (None: .grad was None);
    copy, its values (None: the tensor was bitwise zero, zero_() restores it)."""

    __slots__ = ("grad", "copy")

    def __init__(self, grad, copy):
        self.grad, self.copy = grad, copy


def _bitwise_zero(g: torch.Tensor) -> bool:
    """True when every byte of g is 0 (as zero_grad(set_to_none=False) leaves it; -0.0 is not)."""
    if not g.is_contiguous() or g.is_sparse or g.numel() == 0:
        return g.numel() == 0
    return not bool(g.view(-1).view(torch.uint8).any())


def keep_grads(params: list[torch.Tensor]) -> list[_Kept]:
    """Before a step that accumulates straight into .grad: what a failure needs to restore it bitwise.

    .grad None -> nothing kept (rollback sets None); .grad bitwise zero -> nothing copied (rollback
    zeroes it); any other .grad -> one copy of it. So the fixed cost is at most one copy of the
    gradients, and none after the usual zero_grad(). The tensor object p.grad is kept as it is
    (accumulation and rollback both work in place, as plain accumulation does)."""
    kept = []
    for p in params:
        g = p.grad
        if g is None:
            kept.append(_Kept(None, None))
        elif _bitwise_zero(g):
            kept.append(_Kept(g, None))
        else:
            kept.append(_Kept(g, g.detach().clone(memory_format=torch.preserve_format)))
    return kept


def rollback_grads(params: list[torch.Tensor], kept: list[_Kept]) -> None:
    """A failed step: each .grad goes back to the tensor it was, holding the values it held (bitwise)."""
    for p, k in zip(params, kept):
        if k.grad is None:
            p.grad = None
            continue
        with torch.no_grad():
            if k.copy is None:
                k.grad.zero_()
            else:
                k.grad.copy_(k.copy)
        p.grad = k.grad
