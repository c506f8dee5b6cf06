"""The loss of one chunk, without ever forming full-sequence logits.

The single place where a chunk's hidden states become a loss. Where the head
is a plain nn.Linear without a logit multiplier, the fused
`seqwrap.linear_cross_entropy` is used (logits never exceed its own row chunks);
otherwise this chunk's logits (B, L, vocab) are formed with the model's head
and F.cross_entropy(reduction="sum").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cross_entropy import linear_cross_entropy


def chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                   multiplier: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Sum over the chunk of the token cross-entropies (a 0-d tensor).

    hidden: (B, L, hidden), the decoder's last hidden states of one chunk
    labels: (B, L) int64, already shifted (labels[b, t] is the target of position t), -100 ignored
    multiplier, softcap: the model head's logit transforms (HFDecoderAdapter.logit_transforms):
    logits * multiplier, then softcap * tanh(logits / softcap). Like HF, logits of
    half-precision models are upcast to float32 for the loss (float64 stays float64).
    """
    return _token_losses(lm_head, hidden, labels, ignore_index, multiplier, softcap, "sum")


def chunk_logp_rows(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                    multiplier: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Per-row sums over the chunk of the token log-probabilities of the labels, (B,): row b's
    sum_t log p(labels[b, t]) over its non-ignored labels (0 for a row without one). The same
    head, transforms and precision as chunk_loss_sum, with reduction "none" (one loss per token)
    summed per row: differentiable, so a per-row upstream gradient reaches the head and hidden."""
    return -_token_losses(lm_head, hidden, labels, ignore_index, multiplier, softcap, "none").sum(dim=-1)  # (B,)


def _token_losses(lm_head, hidden, labels, ignore_index, mult, cap, reduction):
    """The chunk's token cross-entropies: reduction "sum" -> 0-d, "none" -> (B, L) (0 where ignored)."""
    labels = labels.to(hidden.device)
    if mult is None and type(lm_head) is nn.Linear:  # (under autocast it casts as lm_head(hidden) would)
        return linear_cross_entropy(hidden, lm_head.weight, labels, lm_head.bias, ignore_index=ignore_index,
                                    reduction=reduction, softcap=cap)
    logits = lm_head(hidden)  # (B, L, vocab)
    if mult is not None:
        logits = logits * mult
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if reduction == "none":
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")
