"""Plain-torch reference of seqwrap.linear_cross_entropy (full logits, autograd)."""
import torch
import torch.nn.functional as F


def reference_linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, z_loss=0.0, softcap=None):
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1)
    keep = y != ignore_index
    per_row = F.cross_entropy(logits, y, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, dim=-1)
    if z_loss:
        per_row = per_row + z_loss * lse**2 * keep
    if reduction == "none":
        return per_row.reshape(labels.shape), lse.reshape(labels.shape)
    total = per_row.sum()
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1)
    return total, lse.reshape(labels.shape)
