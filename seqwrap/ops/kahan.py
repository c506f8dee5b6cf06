"""Compensated (Kahan) scaled gradient accumulation: acc += scale * g in float32.

Summing many small gradient contributions (per chunk, per sample) into a
float32 or bf16 buffer loses the low-order bits of each addend once the sum
is large. A Kahan compensation buffer keeps those bits and feeds them back,
so the float32 sum stays close to the exact (float64) sum.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch

from . import library


def kahan_accumulate_(
    accs: Sequence[torch.Tensor],
    comps: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float = 1.0,
) -> None:
    """In place, for every i: accs[i] += scale * grads[i], Kahan-compensated by comps[i].

    accs[i], comps[i]: float32, contiguous, same shape, not requiring grad.
    grads[i]: float32, bfloat16 or float16, same shape as accs[i], contiguous.
    All tensors on one device (CPU or CUDA). One C call for the whole list;
    on CUDA it runs on torch's current stream without synchronising.
    """
    scale = _scale("seqwrap.kahan_accumulate", scale)
    library.kahan_accumulate(accs, comps, grads, scale)


def _scale(fn: str, scale) -> float:
    """float(scale) for an int, a float or a numpy scalar (np.float32 included)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: 'scale' must be a float, not {type(scale).__name__}")
    return float(scale)


class KahanAccumulator:
    """float32 accumulators with Kahan compensation for a list of tensors.

    acc = KahanAccumulator(params)          # zeros shaped like each param, float32
    acc.add_(grads, scale=1/q)              # one C call for all tensors
    acc.values()                            # the float32 sums

    The compensation buffers double the memory of the accumulators; that is
    the price of keeping about float64 accuracy in float32 storage.
    """

    def __init__(self, like: Iterable[torch.Tensor]):
        like = list(like)
        if not like:
            raise ValueError("KahanAccumulator: give at least one tensor to shape the accumulators")
        for i, t in enumerate(like):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"KahanAccumulator: item {i} must be a torch.Tensor, not {type(t).__name__}")
            if t.numel() == 0:
                raise ValueError(f"KahanAccumulator: tensor {i} has no elements (shape {tuple(t.shape)}); "
                                 "leave it out, there is nothing to accumulate")
        self._acc = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in like]
        self._comp = [torch.zeros_like(a) for a in self._acc]

    def add_(self, grads: Sequence[torch.Tensor], scale: float = 1.0) -> "KahanAccumulator":
        """acc[i] += scale * grads[i] for every i (one gradient per accumulator, same order)."""
        fn = "KahanAccumulator.add_"
        grads = list(grads)
        if len(grads) != len(self._acc):
            raise ValueError(f"{fn}: got {len(grads)} gradients for {len(self._acc)} accumulators")
        for i, g in enumerate(grads):
            if g is None:
                raise TypeError(f"{fn}: grads[{i}] is None (a parameter without a gradient); pass zeros for it, "
                                "or build the accumulator without that tensor")
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{fn}: grads[{i}] must be a torch.Tensor, not {type(g).__name__}")
        kahan_accumulate_(self._acc, self._comp, [g.detach() for g in grads], _scale(fn, scale))
        return self

    def values(self) -> list[torch.Tensor]:
        """The accumulated sums (float32; the live buffers, not copies)."""
        return self._acc

    def zero_(self) -> "KahanAccumulator":
        for a, c in zip(self._acc, self._comp):
            a.zero_()
            c.zero_()
        return self
