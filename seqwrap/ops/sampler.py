"""SpaCO's chunk sampler: which chunks to backpropagate and by what factor (C core).

weights = sample_chunks(k, sampling="bernoulli", probs=[...], seed=s, step=n)
weights[i] == 0: chunk i is not recomputed; otherwise its backward (own loss
and relayed gradient) is multiplied by weights[i]. The draw is a pure function
of (seed, step, chunk index): the same on CPU and GPU, on every run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._ext import C
from ._stream import stream_for

_U64 = 1 << 64


def sample_chunks(num_chunks: int, *, sampling: str = "bernoulli", probs: Sequence[float] | torch.Tensor | None = None,
                  budget: int | None = None, max_compensation: float | None = None, seed: int = 0, step: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 tensor of num_chunks factors on `device`.

    sampling="bernoulli": chunk i kept with probability probs[i] in (0, 1], factor 1/probs[i]
                          (exactly unbiased).
    sampling="fixed":     `budget` chunks kept uniformly without replacement, factor
                          min(num_chunks/budget, max_compensation) (approximately unbiased).
    """
    fn = "seqwrap.sample_chunks"
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"{fn}: num_chunks must be an int >= 1, got {num_chunks!r}")
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _U64:
            raise ValueError(f"{fn}: {name} must be an int in [0, 2**64), got {v!r}")
    weights = torch.empty(num_chunks, dtype=torch.float64, device=device)
    if sampling == "bernoulli":
        if probs is None:
            raise ValueError(f"{fn}: sampling='bernoulli' needs probs (one probability per chunk)")
        if max_compensation is not None:
            raise ValueError(f"{fn}: max_compensation applies to sampling='fixed' only (a cap would bias bernoulli)")
        p = torch.as_tensor(probs, dtype=torch.float64).to(device).contiguous()
        if p.shape != (num_chunks,):
            raise ValueError(f"{fn}: probs has shape {tuple(p.shape)}, expected ({num_chunks},)")
        bad = ~((p > 0) & (p <= 1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{fn}: probability of chunk {i} is {p[i].item()}; every probability must be in (0, 1]")
        C.sample_chunks(weights, p, seed, step, "bernoulli", 0, 0.0, stream_for(weights))
    elif sampling == "fixed":
        if probs is not None:
            raise ValueError(f"{fn}: sampling='fixed' takes a budget, not probs")
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= num_chunks:
            raise ValueError(f"{fn}: budget must be an int between 1 and num_chunks ({num_chunks}), got {budget!r}")
        cap = 0.0 if max_compensation is None else float(max_compensation)
        if max_compensation is not None and not cap >= 1.0:
            raise ValueError(f"{fn}: max_compensation must be >= 1, got {max_compensation!r}")
        C.sample_chunks(weights, None, seed, step, "fixed", budget, cap, stream_for(weights))
    else:
        raise ValueError(f"{fn}: sampling must be 'bernoulli' or 'fixed', not {sampling!r}")
    return weights
