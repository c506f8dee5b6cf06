"""Fused, chunked linear + softmax cross-entropy: never more than one chunk of logits alive.

    loss = seqwrap.linear_cross_entropy(hidden, weight, labels)
    # == F.cross_entropy(F.linear(hidden, weight), labels), without the (N, V) logits

Per chunk of rows, torch computes the logits with one matrix product; the C
(CPU) / CUDA kernel turns them in place into d loss_row / d logits (online
softmax in float32, float64 for float64 input; label smoothing, z-loss,
softcap, ignore_index); torch then forms the chunk's gradients for hidden,
weight and bias with two more matrix products and the chunk is dropped.

When gradients are formed. For reduction "mean" and "sum" the upstream
gradient is one scalar, so the gradients are formed during the forward (3
matrix products per chunk in all) and only scaled in backward. For
reduction "none" the upstream gradient differs per token and is only known in
backward, so the backward recomputes each chunk's logits (4 matrix products
per chunk in all). benchmarks/bench_cross_entropy.py measures both; see
the README for the numbers behind this choice.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from . import cross_entropy_args as args
from . import library
from .dtypes import real_dtype

_OP = "torch.ops.seqwrap.linear_cross_entropy"


def default_chunk_rows(n_rows: int, hidden_size: int, vocab: int) -> int:
    """Rows per chunk: about 2**24 logits (64 MiB in float32), a power of two, at least
    max(16, H // 64) rows so the matrix products stay efficient, at most n_rows."""
    target = 1 << max(0, int(math.log2(max(1, (1 << 24) // vocab))))
    return max(1, min(n_rows, max(target, 16, hidden_size // 64)))


class _Options:
    __slots__ = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "chunk_rows")

    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows):
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_rows = chunk_rows


def _chunked_pass(hidden, weight, bias, labels, opt, *, row_scale, need):
    """Runs every chunk once. hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64.

    row_scale: None or (N,) real-dtype upstream gradient per row (multiplies the logits gradient).
    need: (hidden, weight, bias) booleans: which gradients to form.
    Returns loss_rows (N,), lse (N,) in the real dtype and the requested gradients
    (grad_weight / grad_bias accumulated in the real dtype)."""
    with _no_autocast(hidden.device):
        return _chunks(hidden, weight, bias, labels, opt, row_scale, need)


def _chunks(hidden, weight, bias, labels, opt, row_scale, need):
    n, _ = hidden.shape
    vocab = weight.shape[0]
    real = real_dtype(hidden.dtype)
    dev = hidden.device
    loss_rows = torch.empty(n, dtype=real, device=dev)
    lse = torch.empty(n, dtype=real, device=dev)
    compute_grad = any(need)
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=real, device=dev) if need[1] else None
    grad_bias = torch.zeros(vocab, dtype=real, device=dev) if need[2] else None
    flag = torch.zeros(1, dtype=torch.int32, device=dev) if dev.type == "cuda" else None
    softcap = float(opt.softcap) if opt.softcap is not None else 0.0
    weight_t = weight.t()
    for start in range(0, n, opt.chunk_rows):
        end = min(n, start + opt.chunk_rows)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else torch.mm(h, weight_t)  # (rows, V)
        library.cross_entropy_chunk(
            logits, labels[start:end], loss_rows[start:end], lse[start:end],
            None if row_scale is None else row_scale[start:end],
            opt.ignore_index, opt.label_smoothing, opt.z_loss, softcap, compute_grad, flag, start,
        )
        if compute_grad:  # logits now hold d loss_row / d logits, (rows, V)
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                if logits.dtype == real:
                    grad_weight.addmm_(logits.t(), h)
                else:  # half precision products, float32 accumulation across chunks
                    grad_weight.add_(torch.mm(logits.t(), h))
            if grad_bias is not None:
                grad_bias.add_(logits.sum(0, dtype=real))
        del logits
    if flag is not None and int(flag.item()) != 0:
        raise ValueError(
            "seqwrap.linear_cross_entropy: a label is outside [0, "
            f"{vocab}) and is not ignore_index ({opt.ignore_index})"
        )
    return loss_rows, lse, grad_hidden, grad_weight, grad_bias


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast: the inputs cast as autocast casts those of F.linear (floating, not
    float64, to the autocast dtype). Outside it, unchanged."""
    dev = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    low = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _no_autocast(device: torch.device):
    """The chunk loop runs in the dtypes it was given: autocast would turn its matrix products
    (written into buffers with out=) to another dtype."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _reduce(loss_rows, labels, opt):
    """(the loss of `opt.reduction` from per-row losses, the count of non-ignored labels (>= 1))."""
    n_valid = (labels != opt.ignore_index).sum().clamp(min=1).to(loss_rows.dtype)
    if opt.reduction == "mean":
        return loss_rows.sum() / n_valid, n_valid
    if opt.reduction == "sum":
        return loss_rows.sum(), n_valid
    return loss_rows, n_valid


# -- the op: seqwrap::linear_cross_entropy and its backward ----------------------------------------------
# Options travel as plain schema arguments; the loop over chunks runs inside the op (opaque to
# torch.compile, which keeps the op whole in its graph).
def _options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows):
    return _Options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows)


def _none(t):
    return t if t.numel() or t.dim() != 1 else None  # (0,) placeholders stand for "not formed"


@torch.library.custom_op("seqwrap::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                            ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                            softcap: float | None, chunk_rows: int, need_hidden: bool, need_weight: bool,
                            need_bias: bool, consume_buffers: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64 -> (loss (() or (N,) for "none"),
    lse (N,), grad_hidden (N, H), grad_weight (V, H) real, grad_bias (V,) real, n_valid ()), the three
    gradients of sum(loss_rows) formed in forward for "mean"/"sum" when needed, else (0,)
    placeholders. Its autograd formula scales them (or, for "none", recomputes). consume_buffers=True
    (what seqwrap.linear_cross_entropy passes: it drops these outputs) lets the formula scale them in
    place and hand them on as the gradients when its backward is their last reader; a caller that keeps
    the gradient outputs passes False."""
    args.check_op(_OP, hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index)
    opt = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows)
    need = (need_hidden, need_weight, need_bias and bias is not None) if reduction != "none" else (False,) * 3
    loss_rows, lse, gh, gw, gb = _chunked_pass(hidden, weight, bias, labels, opt, row_scale=None, need=need)
    loss, n_valid = _reduce(loss_rows, labels, opt)
    fill = lambda g: hidden.new_empty(0) if g is None else g  # noqa: E731  (outputs must not alias)
    return loss.clone() if reduction == "none" else loss, lse, fill(gh), fill(gw), fill(gb), n_valid


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows,
      need_hidden, need_weight, need_bias, consume_buffers=False):
    args.check_op(_OP, hidden, weight, bias, labels, reduction=reduction, label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index)
    n, h = hidden.shape
    v = weight.shape[0]
    real = real_dtype(hidden.dtype)
    grads = reduction != "none"
    e = lambda *s, dt=real: hidden.new_empty(s, dtype=dt)  # noqa: E731
    return (e(n) if reduction == "none" else e(), e(n),
            e(n, h, dt=hidden.dtype) if grads and need_hidden else e(0, dt=hidden.dtype),
            e(v, h) if grads and need_weight else e(0, dt=hidden.dtype),
            e(v) if grads and need_bias and bias is not None else e(0, dt=hidden.dtype), e())


@torch.library.custom_op("seqwrap::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     labels: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
                                     label_smoothing: float, z_loss: float, softcap: float | None, chunk_rows: int,
                                     need_hidden: bool, need_weight: bool, need_bias: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction "none": the gradients for per-row upstream gradients row_scale (N,) real, recomputing the
    logits chunk by chunk. (0,) placeholders for gradients not needed."""
    args.check_op(_OP + "_backward", hidden, weight, bias, labels, reduction="none", label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index, row_scale=row_scale)
    opt = _options(ignore_index, "none", label_smoothing, z_loss, softcap, chunk_rows)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    _, _, gh, gw, gb = _chunked_pass(hidden, weight, bias, labels, opt, row_scale=row_scale, need=need)
    fill = lambda g: hidden.new_empty(0) if g is None else g  # noqa: E731  (outputs must not alias)
    return fill(gh), fill(gw), fill(gb)


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, bias, labels, row_scale, ignore_index, label_smoothing, z_loss, softcap, chunk_rows,
      need_hidden, need_weight, need_bias):
    args.check_op(_OP + "_backward", hidden, weight, bias, labels, reduction="none", label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index, row_scale=row_scale)
    n, h = hidden.shape
    v = weight.shape[0]
    real = real_dtype(hidden.dtype)
    e = lambda *s, dt=real: hidden.new_empty(s, dtype=dt)  # noqa: E731
    return (e(n, h, dt=hidden.dtype) if need_hidden else e(0, dt=hidden.dtype),
            e(v, h) if need_weight else e(0, dt=hidden.dtype),
            e(v) if need_bias and bias is not None else e(0, dt=hidden.dtype))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, smoothing, z_loss, softcap, rows, nh, nw, nb, *consume = inputs
    _, _, gh, gw, gb, n_valid = output
    ctx.reduction = reduction
    ctx.consume = bool(consume and consume[0])
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction != "none":
        ctx.save_for_backward(gh, gw, gb, n_valid)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (ignore_index, smoothing, z_loss, softcap, rows, nh, nw, nb)


def _buffers_are_ours() -> bool:
    """True when this backward is the last reader of the forward-formed gradient buffers: the graph is
    not retained (autograd frees the saved tensors right after this backward), no graph of the
    backward is built (create_graph) and no compiler traces it. Then they may be scaled in place and
    handed on: no second gradient-sized copy. Otherwise (retain_graph, gradcheck, double backward) a
    later backward reads them again, so they are scaled out of place."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not inside an engine-run backward (a direct call of the formula)
        return False


def _scaled(g, scale, consume):
    """g * scale, in place when the op's caller gave the buffers up (consume) and they are ours (see
    _buffers_are_ours). scale: 0-dim."""
    scale = scale.to(g.dtype)
    # plain eager tensors only: under a tracer (fake / functional tensor subclasses) stay out of place
    if not consume or type(g) is not torch.Tensor or type(scale) is not torch.Tensor or not _buffers_are_ours():
        return g * scale
    if scale.device.type == "cpu" and scale.dim() == 0 and float(scale) == 1.0:  # cheap on the host: skip a pass
        return g
    return g.mul_(scale)


def _backward(ctx, grad_loss, _glse, _gh, _gw, _gb, _gn):
    if ctx.reduction != "none":
        gh, gw, gb, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid if ctx.reduction == "mean" else grad_loss
        grads = [None if _none(g) is None else _scaled(g, scale, ctx.consume) for g in (gh, gw, gb)]
    else:
        hidden, weight, bias, labels = ctx.saved_tensors
        row_scale = grad_loss.reshape(-1).to(real_dtype(hidden.dtype)).contiguous()
        grads = [_none(g) for g in torch.ops.seqwrap.linear_cross_entropy_backward(
            hidden, weight, bias, labels, row_scale, *ctx.args)]
    out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
    return (out[0], out[1], out[2]) + (None,) * 11


torch.library.register_autograd("seqwrap::linear_cross_entropy", _backward, setup_context=_setup_context)


class LinearCrossEntropyOutput(NamedTuple):
    """What linear_cross_entropy returns when a per-token statistic is asked for (None where not asked).
    loss and z_loss are differentiable; the others are not. Per-token fields are shaped like the
    (shifted) labels; token_accuracy is the fraction of non-ignored tokens whose argmax is the label
    (per token 0/1 for reduction "none")."""
    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _shift_labels(labels, shift, ignore_index):
    """HF-style shift inside the op: position t is scored against labels[..., t + shift]; the last
    `shift` positions get ignore_index. No copy of the hidden states (only the labels move)."""
    if isinstance(shift, bool) or shift is None:
        shift = int(bool(shift))
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"seqwrap.linear_cross_entropy: 'shift' must be a bool or an int >= 0, not {shift!r}")
    if shift == 0:
        return labels, 0
    if labels.dim() < 1 or labels.shape[-1] <= shift:
        raise ValueError(f"seqwrap.linear_cross_entropy: shift={shift} needs labels with more than {shift} "
                         f"positions in the last dimension, got shape {tuple(labels.shape)}")
    pad = labels.new_full(labels.shape[:-1] + (shift,), ignore_index)
    return torch.cat([labels[..., shift:], pad], dim=-1), shift


def _check_ce_weight(ce_weight, weight, hidden):
    if ce_weight is None:
        return
    if not isinstance(ce_weight, torch.Tensor) or not ce_weight.is_floating_point():
        raise TypeError("seqwrap.linear_cross_entropy: 'ce_weight' must be a floating tensor of shape (V,)")
    if ce_weight.shape != (weight.shape[0],):
        raise ValueError(f"seqwrap.linear_cross_entropy: 'ce_weight' has shape {tuple(ce_weight.shape)}; "
                         f"expected ({weight.shape[0]},), one weight per class")
    if ce_weight.device != hidden.device:
        raise ValueError(f"seqwrap.linear_cross_entropy: 'ce_weight' is on {ce_weight.device}, hidden on {hidden.device}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    shift: bool | int = False,
    ce_weight: torch.Tensor | None = None,
    use_token_scaling: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    return_entropy: bool = False,
):
    """Cross-entropy of F.linear(hidden, weight, bias) against labels, chunk by chunk.

    hidden (..., H), weight (V, H), labels (...) integer, bias (V,) or None.
    Same meaning as F.cross_entropy(F.linear(hidden, weight, bias), labels, ...) with:
      z_loss   adds z_loss * lse**2 per (non-ignored) token;
      softcap  applies softcap * tanh(logits / softcap) before the softmax (Gemma 2).
    reduction "mean" divides by the number of non-ignored labels; with every label
    ignored the loss is 0 and the gradients are 0 (F.cross_entropy gives nan).
    The loss is float32 (float64 for float64 input). Under torch.autocast it behaves as
    F.linear does there (hidden, weight, bias cast to the autocast dtype; float64 left
    alone) followed by a float32 cross-entropy. chunk_size: rows of logits per
    chunk; None picks one from H and V (default_chunk_rows).
    return_lse=True also returns the per-token log-sum-exp, shaped like labels
    (not differentiable). A label outside [0, V) that is not ignore_index raises
    ValueError (on CUDA after the kernel, from a device-side flag).

    Liger-Kernel / CCE options:
      shift=True (or k)  score position t against labels[..., t + k] (HF's logits[..., :-1] vs
                         labels[..., 1:]); "none" returns (..., T - k). Labels only move.
      ce_weight (V,)     class weights with F.cross_entropy's semantics ("mean" divides by the sum
                         of the label weights of non-ignored tokens).
      use_token_scaling  each token's cross-entropy times the detached probability of its label.
      return_z_loss      also return the z-loss term (already included in the loss), differentiable:
                         (loss, z_loss); any combination of the two gets exact gradients.
      return_token_accuracy / return_predicted_tokens / return_entropy: non-differentiable per-token
                         statistics; with any of them a LinearCrossEntropyOutput is returned.
    ce_weight, use_token_scaling, return_z_loss and the statistics run a chunked torch-op path
    (cross_entropy_extras.py: logits recomputed per chunk in backward, same memory bound, slower
    than the C kernel path, which serves every other call).
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    args.check("seqwrap.linear_cross_entropy", hidden, weight, labels, bias, reduction=reduction,
               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_rows=chunk_size,
               ignore_index=ignore_index)
    _check_ce_weight(ce_weight, weight, hidden)
    labels, k = _shift_labels(labels, shift, ignore_index)
    lead_shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2 = h2 if h2.is_contiguous() else h2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = labels.reshape(-1).to(torch.int64)
    y = y if y.is_contiguous() else y.contiguous()
    n = h2.shape[0]
    rows = chunk_size if chunk_size is not None else default_chunk_rows(n, w.shape[1], w.shape[0])
    unshift = (lambda t: t[..., : t.shape[-1] - k]) if k else (lambda t: t)  # noqa: E731
    stats = return_token_accuracy or return_predicted_tokens or return_entropy
    if ce_weight is not None or use_token_scaling or return_z_loss or stats:
        return _extras(h2, w, bias, y, lead_shape, unshift, rows, ignore_index=int(ignore_index),
                       reduction=reduction, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                       softcap=None if softcap is None else float(softcap), ce_weight=ce_weight,
                       token_scaling=bool(use_token_scaling), return_z_loss=return_z_loss,
                       flags=(return_lse, return_token_accuracy, return_predicted_tokens, return_entropy))
    # which gradients to form: none at all without a graph (no_grad, inference): the loss alone
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (h2, w, bias)]
    loss, lse, *_ = torch.ops.seqwrap.linear_cross_entropy(
        h2, w, bias, y, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), int(rows), *need, True)
    if reduction == "none":
        loss = unshift(loss.reshape(lead_shape))
    lse = unshift(lse.detach().reshape(lead_shape))  # not differentiable
    return (loss, lse) if return_lse else loss


def _extras(h2, w, bias, y, lead_shape, unshift, rows, *, return_z_loss, flags, **opt):
    from .cross_entropy_extras import extras_loss

    want_lse, want_acc, want_pred, want_ent = flags
    want_stats = want_acc or want_pred or want_ent
    loss, z, pred, ent = extras_loss(h2, w, bias, y, rows=rows, want_stats=want_stats, **opt)
    per_token = lambda t: unshift(t.reshape(lead_shape))  # noqa: E731
    if opt["reduction"] == "none":
        loss, z = per_token(loss), per_token(z)
    if not (want_stats or want_lse):
        return (loss, z) if return_z_loss else loss
    keep = y != opt["ignore_index"]
    acc = None
    if want_acc:
        hit = ((pred == y) & keep).to(loss.dtype)
        acc = per_token(hit) if opt["reduction"] == "none" else hit.sum() / keep.sum().clamp(min=1).to(loss.dtype)
    lse = None
    if want_lse:
        with torch.no_grad():
            lse = torch.cat([torch.logsumexp(_capped(h2[a:a + rows], w, bias, opt["softcap"]), -1)
                             for a in range(0, h2.shape[0], rows)])
        lse = per_token(lse)
    return LinearCrossEntropyOutput(loss, z if return_z_loss else None, lse, acc,
                                    per_token(pred) if want_pred else None, per_token(ent) if want_ent else None)


def _capped(h, w, bias, softcap):
    logits = torch.nn.functional.linear(h, w, bias).to(real_dtype(h.dtype))
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits
