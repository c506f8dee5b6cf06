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
import numbers

import torch
from torch.autograd.function import once_differentiable

from .._ext import C
from ._stream import stream_for
from .dtypes import real_dtype

_REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    stream = stream_for(hidden)
    softcap = float(opt.softcap) if opt.softcap is not None else 0.0
    weight_t = weight.t()
    for start in range(0, n, opt.chunk_rows):
        end = min(n, start + opt.chunk_rows)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else torch.mm(h, weight_t)  # (rows, V)
        C.cross_entropy_chunk(
            logits, labels[start:end], loss_rows[start:end], lse[start:end],
            None if row_scale is None else row_scale[start:end],
            opt.ignore_index, opt.label_smoothing, opt.z_loss, softcap, compute_grad, flag, stream, start,
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


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opt):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grads_now = opt.reduction != "none"
        loss_rows, lse, gh, gw, gb = _chunked_pass(
            hidden, weight, bias, labels, opt, row_scale=None, need=need if grads_now else (False,) * 3
        )
        loss, n_valid = _reduce(loss_rows, labels, opt)
        ctx.opt = opt
        ctx.need = need
        ctx.grads_now = grads_now
        ctx.param_dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if grads_now:
            ctx.save_for_backward(gh, gw, gb, n_valid)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        opt = ctx.opt
        if ctx.grads_now:
            gh, gw, gb, n_valid = ctx.saved_tensors
            scale = grad_loss / n_valid if opt.reduction == "mean" else grad_loss
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            row_scale = grad_loss.reshape(-1).to(real_dtype(hidden.dtype)).contiguous()
            _, _, gh, gw, gb = _chunked_pass(hidden, weight, bias, labels, opt, row_scale=row_scale, need=ctx.need)
            scale = None
        out = []
        for g, dtype in zip((gh, gw, gb), ctx.param_dtypes):
            if g is None:
                out.append(None)
                continue
            g = g * scale.to(g.dtype) if scale is not None else g
            out.append(g.to(dtype))
        return out[0], out[1], out[2], None, None


def _check(hidden, weight, labels, bias, reduction, label_smoothing, z_loss, softcap, chunk_size, ignore_index):
    fn = "seqwrap.linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: 'bias' must be a torch.Tensor or None, not {type(bias).__name__}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"{fn}: 'hidden' has dtype {hidden.dtype}; expected float32, float16, bfloat16 or float64")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"{fn}: 'weight' ({weight.dtype}) and 'bias' must have the dtype of 'hidden' ({hidden.dtype})")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: 'labels' must hold integer class indices (int64), not {labels.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: 'hidden' {tuple(hidden.shape)} must be (..., H) and 'weight' {tuple(weight.shape)} (V, H)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{fn}: 'labels' has shape {tuple(labels.shape)} but 'hidden' needs {tuple(hidden.shape[:-1])}")
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: 'weight' must be non-empty, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{fn}: 'bias' has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    devices = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, not {reduction!r}")
    if not 0.0 <= _real_number(fn, "label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    z = _real_number(fn, "z_loss", z_loss)
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        cap = _real_number(fn, "softcap", softcap, "None or a finite number > 0")
        if not (cap > 0.0 and math.isfinite(cap)):
            raise ValueError(f"{fn}: softcap must be None or a finite number > 0, got {softcap}")
        if hidden.dtype != torch.float64 and not _F32_MIN <= cap <= _F32_MAX:
            # float32 compute: the cap would round to 0 (no cap at all) or to infinity (NaN)
            raise ValueError(f"{fn}: softcap {softcap!r} does not fit float32, the compute dtype of {hidden.dtype} "
                             f"logits (it must be in [{_F32_MIN:.6g}, {_F32_MAX:.6g}]); use float64 inputs for it")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"{fn}: ignore_index must fit int64 (the dtype of the labels), got {ignore_index}")


_F32_MIN = float(torch.finfo(torch.float32).tiny)  # smallest normal float32
_F32_MAX = float(torch.finfo(torch.float32).max)


def _real_number(fn: str, name: str, value, what: str = "a real number") -> float:
    """float(value) for an int / float / numpy scalar; TypeError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be {what}, not {value!r}")
    return float(value)


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
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check(hidden, weight, labels, bias, reduction, label_smoothing, z_loss, softcap, chunk_size, ignore_index)
    lead_shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2 = h2 if h2.is_contiguous() else h2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = labels.reshape(-1).to(torch.int64)
    y = y if y.is_contiguous() else y.contiguous()
    n = h2.shape[0]
    if n == 0:
        raise ValueError("seqwrap.linear_cross_entropy: 'hidden' holds no tokens")
    rows = chunk_size if chunk_size is not None else default_chunk_rows(n, w.shape[1], w.shape[0])
    opt = _Options(int(ignore_index), reduction, float(label_smoothing), float(z_loss), softcap, rows)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h2, w, bias)):
        loss, lse = _LinearCrossEntropy.apply(h2, w, bias, y, opt)
    else:  # no graph (no_grad, inference): the loss alone, no gradient products
        loss_rows, lse, _, _, _ = _chunked_pass(h2, w, bias, y, opt, row_scale=None, need=(False,) * 3)
        loss = _reduce(loss_rows, y, opt)[0]
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    lse = lse.reshape(lead_shape)
    return (loss, lse) if return_lse else loss
