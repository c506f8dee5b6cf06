"""The fused linear cross-entropy's extra features (Liger-Kernel / CCE options), chunk by chunk in torch ops.

Served here, never by the C kernel path: class weights (ce_weight, torch's semantics), token scaling
(Liger's use_token_scaling: each token's loss times the detached probability of its label), a
differentiable z-loss output (return_z_loss) and the non-differentiable per-token outputs (predicted
tokens = argmax, token accuracy, entropy of the softmax). seqwrap.linear_cross_entropy routes a call
here only when one of these is asked for (stated in its docstring and README).

Memory: like the kernel path, never more than one chunk of logits (a few (rows, V) temporaries of that
chunk) alive. The forward runs without a graph; the backward recomputes each chunk's logits with
autograd and pulls the per-row upstream gradients of both outputs (loss rows and z-loss rows) through
them, so any combination the caller makes of the two outputs gets exact gradients (4 matrix products
per chunk, as for reduction "none" on the kernel path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dtypes import real_dtype


def _chunk_terms(h, weight, bias, y, *, ignore_index, label_smoothing, z_loss, softcap, ce_weight,
                 token_scaling):
    """One chunk: h (rows, H), y (rows,) -> (loss rows (rows,) incl. z-loss, z-loss rows, the per-row
    class weight w[y] (0 where ignored), capped logits s (rows, V) in the real dtype)."""
    real = real_dtype(h.dtype)
    logits = F.linear(h, weight, bias).to(real)
    s = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    keep = y != ignore_index
    ce = F.cross_entropy(s, y, weight=ce_weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(s, dim=-1)
    zero = torch.zeros((), dtype=real, device=h.device)
    z_rows = torch.where(keep, z_loss * lse * lse, zero) if z_loss else torch.zeros_like(lse)
    if token_scaling:  # times p(label), detached (Liger's use_token_scaling)
        p_label = torch.exp(s.gather(1, torch.where(keep, y, 0)[:, None])[:, 0] - lse).detach()
        ce = ce * p_label
    w_y = keep.to(real) if ce_weight is None else torch.where(keep, ce_weight[torch.where(keep, y, 0)], zero)
    return ce + z_rows, z_rows, w_y, s


class _ExtrasFn(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,)|None) -> (loss rows (N,), z rows (N,), w_y (N,),
    predicted (N,) int64, entropy (N,)); the last three carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opt, rows, want_stats):
        n = hidden.shape[0]
        real = real_dtype(hidden.dtype)
        out = [torch.empty(n, dtype=real, device=hidden.device) for _ in range(3)]
        pred = torch.empty(n if want_stats else 0, dtype=torch.int64, device=hidden.device)
        ent = torch.empty(n if want_stats else 0, dtype=real, device=hidden.device)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            loss_r, z_r, w_y, s = _chunk_terms(hidden[a:b], weight, bias, labels[a:b], **opt)
            out[0][a:b], out[1][a:b], out[2][a:b] = loss_r, z_r, w_y
            if want_stats:
                pred[a:b] = s.argmax(-1)
                logp = torch.log_softmax(s, -1)
                ent[a:b] = -(logp.exp() * logp).sum(-1)
            del s
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.opt, ctx.rows = opt, rows
        ctx.mark_non_differentiable(out[2], pred, ent)
        return out[0], out[1], out[2], pred, ent

    @staticmethod
    def backward(ctx, g_loss, g_z, _gw, _gp, _ge):
        hidden, weight, bias, labels = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        real = real_dtype(hidden.dtype)
        gh = torch.zeros_like(hidden) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=real, device=weight.device) if need[1] else None
        gb = torch.zeros(bias.shape, dtype=real, device=bias.device) if need[2] else None
        g_loss = torch.zeros(hidden.shape[0], dtype=real, device=hidden.device) if g_loss is None else g_loss
        for a in range(0, hidden.shape[0], ctx.rows):
            b = min(hidden.shape[0], a + ctx.rows)
            with torch.enable_grad():
                h = hidden[a:b].detach().requires_grad_(need[0])
                w = weight.detach().requires_grad_(need[1])
                bb = None if bias is None else bias.detach().requires_grad_(need[2])
                loss_r, z_r, _, _ = _chunk_terms(h, w, bb, labels[a:b], **ctx.opt)
                total = (loss_r * g_loss[a:b].to(real)).sum()
                if g_z is not None:
                    total = total + (z_r * g_z[a:b].to(real)).sum()
                wrt = [t for t, k in zip((h, w, bb), need) if k]
                grads = iter(torch.autograd.grad(total, wrt, allow_unused=True))
            if need[0]:
                gh[a:b] = next(grads)
            if need[1]:
                gw += next(grads)
            if need[2]:
                gb += next(grads)
        cast = lambda g, t: None if g is None else g.to(t.dtype)  # noqa: E731
        return cast(gh, hidden), cast(gw, weight), cast(gb, bias), None, None, None, None


def extras_loss(hidden, weight, bias, labels, *, ignore_index, reduction, label_smoothing, z_loss, softcap,
                ce_weight, token_scaling, rows, want_stats):
    """hidden (N, H), labels (N,) int64. Returns (loss, z_loss, predicted (N,), entropy (N,)) with the
    reduction applied to loss and z_loss: "mean" divides by the sum of the label weights w[y] over
    non-ignored rows (the count without ce_weight; at least a tiny positive number: all ignored gives 0)."""
    if ce_weight is not None:
        ce_weight = ce_weight.to(real_dtype(hidden.dtype))
    opt = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
               ce_weight=ce_weight, token_scaling=token_scaling)
    loss_r, z_r, w_y, pred, ent = _ExtrasFn.apply(hidden, weight, bias, labels, opt, rows, want_stats)
    if reduction == "none":
        return loss_r, z_r, pred, ent
    loss, z = loss_r.sum(), z_r.sum()
    if reduction == "mean":
        denom = w_y.sum()
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        loss, z = loss / denom, z / denom
    return loss, z, pred, ent
