"""The loss of one chunk, without ever forming full-sequence logits.

The single place where a chunk's hidden states become a loss. Where the
fused `seqwrap.linear_cross_entropy` exists (seqwrap.ops.cross_entropy) and the
head is a plain nn.Linear, it is used (logits never exceed its own row chunks);
otherwise this chunk's logits (B, L, vocab) are formed with the model's head
and F.cross_entropy(reduction="sum").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # on branches where the fused op has landed
    from ..ops.cross_entropy import linear_cross_entropy as _fused
except ImportError:  # pragma: no cover - depends on the branch
    _fused = None


def _logit_transforms(config):
    """(multiplier or None, softcap or None) of the model's head (Cohere, Granite, Gemma2)."""
    mult = None
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and getattr(config, "model_type", "").startswith("cohere"):
        mult = float(scale)
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        mult = (mult or 1.0) / float(scaling)
    return mult, getattr(config, "final_logit_softcapping", None)


def chunk_loss_sum(causal_lm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """Sum over the chunk of the token cross-entropies (a 0-d tensor).

    hidden: (B, L, hidden), the decoder's last hidden states of one chunk
    labels: (B, L) int64, already shifted (labels[b, t] is the target of position t), -100 ignored
    Follows the model's own head: Gemma2's `final_logit_softcapping` (cap * tanh(z / cap)),
    Cohere's `logit_scale` and Granite's `logits_scaling`. Like HF, logits of
    half-precision models are upcast to float32 for the loss (float64 stays float64).
    """
    mult, cap = _logit_transforms(causal_lm.config)
    labels = labels.to(hidden.device)
    if _fused is not None and mult is None and type(lm_head) is nn.Linear:
        return _fused(hidden, lm_head.weight, labels, lm_head.bias, ignore_index=ignore_index, reduction="sum",
                      softcap=cap)
    logits = lm_head(hidden)  # (B, L, vocab)
    if mult is not None:
        logits = logits * mult
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
