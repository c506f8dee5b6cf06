"""Causal-LM label shift, HF's convention, in one place."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels (..., T) aligned with the inputs -> (..., T) targets: out[..., t] = labels[..., t + 1], and
    ignore_index at the last position (it predicts nothing)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)
