"""The loss of one chunk, without ever forming full-sequence logits.

The single place where a chunk's hidden states become a loss. It forms only
this chunk's logits (B, L, vocab); when `seqwrap.linear_cross_entropy` lands it
replaces the body (same arguments, same result).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def chunk_loss_sum(causal_lm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """Sum over the chunk of the token cross-entropies (a 0-d tensor).

    hidden: (B, L, hidden), the decoder's last hidden states of one chunk
    labels: (B, L) int64, already shifted (labels[b, t] is the target of position t), -100 ignored
    Follows the model's own head: Gemma2's `final_logit_softcapping` (cap * tanh(z / cap)),
    Cohere's `logit_scale` and Granite's `logits_scaling`. Like HF, logits of
    half-precision models are upcast to float32 for the loss (float64 stays float64).
    """
    config = causal_lm.config
    logits = lm_head(hidden)  # (B, L, vocab)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and getattr(config, "model_type", "").startswith("cohere"):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction="sum")
