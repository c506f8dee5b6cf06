"""Ulysses for recurrent (Mamba-2 / SSD) layers: the head split and its two all-to-all switches.

The scheme of Megatron-core's Mamba context parallelism, the same exchange as Ulysses attention:
each of P ranks holds s = S/P tokens of all H heads; one all-to-all gives it all S tokens of H/P
heads (the heads' x channels, their dt, and the B/C channels of the groups those heads read);
the causal conv and the scan run over the whole sequence for those channels (so no halo exchange
is needed: the conv is depthwise, each channel sees its own past only); a second all-to-all
brings the scan output back to the rank's s tokens of all heads.

Rank r holds heads [r*H/P, (r+1)*H/P). With G B/C groups (head h reads group h // (H/G)), the
rank needs the G/P groups [r*G/P, (r+1)*G/P) when P divides G, or the single group of its heads
when G divides P (fewer groups than ranks: a group is replicated to the ranks that read it, as
Ulysses replicates K/V heads). Other (H, G, P) are refused.

No transformers here: seqwrap/hf/mamba2_ulysses.py maps an HF mixer onto a HeadSplit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .all_to_all import _exchange


class _Exchange(torch.autograd.Function):
    """all_to_all_single over dim 0 (the rank count): block j goes to rank j, block j of the result
    came from rank j. It is its own adjoint, so backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.group), None


@dataclass(frozen=True)
class HeadSplit:
    """Which channels of a Mamba-2 layer rank `rank` of `world` owns after the switch.

    heads H, head_dim Dh, groups G, state N: the layer's SSD sizes; the conv input is
    [x (H*Dh) ; B (G*N) ; C (G*N)] channels, then dt (H) follows in the exchanged tensor."""
    group: object
    world: int
    rank: int
    heads: int
    head_dim: int
    groups: int
    state: int

    @classmethod
    def make(cls, group, heads: int, head_dim: int, groups: int, state: int, what: str) -> "HeadSplit":
        p, r = dist.get_world_size(group), dist.get_rank(group)
        if heads % p:
            raise ValueError(f"seqwrap.parallel: {what} has {heads} SSM heads, which cannot be split over {p} ranks")
        if groups % p and p % groups:
            raise ValueError(f"seqwrap.parallel: {what} has {groups} B/C groups; under Ulysses over {p} ranks the "
                             "group count must be a multiple or a divisor of the rank count")
        return cls(group, p, r, heads, head_dim, groups, state)

    @property
    def local_heads(self) -> int:
        return self.heads // self.world

    @property
    def local_groups(self) -> int:
        return max(self.groups // self.world, 1)

    def head_slice(self, r: int | None = None) -> slice:
        r = self.rank if r is None else r
        return slice(r * self.local_heads, (r + 1) * self.local_heads)

    def first_group(self, r: int) -> int:
        return (r * self.local_heads) // (self.heads // self.groups)

    def conv_channels(self, r: int | None = None) -> torch.Tensor:
        """Indices into the conv input [x ; B ; C] of rank r's channels: its heads' x, then its groups'
        B and C. (conv channels of rank r,)"""
        r = self.rank if r is None else r
        dh, n, g0, gl = self.head_dim, self.state, self.first_group(r), self.local_groups
        inner, bc = self.heads * dh, self.groups * n
        x = torch.arange(r * self.local_heads * dh, (r + 1) * self.local_heads * dh)
        b = inner + torch.arange(g0 * n, (g0 + gl) * n)
        return torch.cat([x, b, b + bc])

    def send_index(self) -> torch.Tensor:
        """(P, c): for each destination rank j, the columns of [conv input ; dt] (B, s, conv_dim + H) it gets."""
        conv_dim = self.heads * self.head_dim + 2 * self.groups * self.state
        rows = []
        for j in range(self.world):
            dt = conv_dim + torch.arange(self.heads)[self.head_slice(j)]
            rows.append(torch.cat([self.conv_channels(j), dt]))
        return torch.stack(rows)


def tokens_to_heads(local: torch.Tensor, split: HeadSplit) -> torch.Tensor:
    """local (B, s, conv_dim + H): this rank's s tokens, every channel, [conv input ; dt]. Returns
    (B, P*s, c): the whole sequence (ranks' slices in rank order) of this rank's c channels
    (split.conv_channels() then its heads' dt). Differentiable (the gradient goes back by the
    reverse exchange and a scatter-add into the channels, replicated groups summed)."""
    b, s, _ = local.shape
    idx = split.send_index().to(local.device)                           # (P, c)
    send = local[:, :, idx.reshape(-1)].reshape(b, s, split.world, -1)  # (B, s, P, c)
    recv = _Exchange.apply(send.permute(2, 0, 1, 3), split.group)       # (P, B, s, c): block j = rank j's tokens
    return recv.permute(1, 0, 2, 3).reshape(b, split.world * s, -1)


def heads_to_tokens(y: torch.Tensor, split: HeadSplit) -> torch.Tensor:
    """y (B, P*s, H/P * Dh): the scan output of this rank's heads over the whole sequence. Returns
    (B, s, H * Dh): this rank's tokens, all heads in order. Differentiable."""
    b, n, c = y.shape
    p = split.world
    send = y.reshape(b, p, n // p, c).permute(1, 0, 2, 3)                # (P, B, s, c): slice j -> rank j
    recv = _Exchange.apply(send, split.group)                             # block j: rank j's heads
    return recv.permute(1, 2, 0, 3).reshape(b, n // p, p * c)
