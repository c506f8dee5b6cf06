"""Differentiable switches between sequence shards and head shards (Ulysses).

Each of P ranks holds x_local (B, H, S/P, D): all heads, its contiguous slice
of the sequence. seq_to_heads gives (B, H/P, S, D): the whole sequence for its
H/P heads (rank r gets heads [r*H/P, (r+1)*H/P)); heads_to_seq inverts it.
Both are one all_to_all_single; their backward is the other switch.
"""
import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 of a contiguous tensor whose dim 0 is the rank count."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x (empty_like keeps a view's strides)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x, group):
    p = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.reshape(b, p, h // p, s, d).permute(1, 0, 2, 3, 4)      # (P, B, H/P, s, D): block r -> rank r
    recv = _exchange(send, group)                                     # block j: rank j's sequence slice
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)   # (B, H/P, S, D), slices in rank order


def _heads_to_seq(x, group):
    p = dist.get_world_size(group)
    b, hp, n, d = x.shape
    send = x.reshape(b, hp, p, n // p, d).permute(2, 0, 1, 3, 4)     # (P, B, H/P, s, D): slice r -> rank r
    recv = _exchange(send, group)                                     # block j: rank j's heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * hp, n // p, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), ctx.group), None
