"""The argument rules of the fused linear cross-entropy, one function for the public wrapper
(seqwrap.linear_cross_entropy) and for the implementations of the registered ops
(torch.ops.seqwrap.linear_cross_entropy / _backward), which a compiled graph calls directly.

Every rule looks at shapes, dtypes, devices and Python scalars only (no tensor values), so the ops'
fake implementations run it too and a bad call is refused while torch.compile traces. The one value
rule, labels in [0, V) or ignore_index, is checked by the kernel itself (a device-side flag on CUDA).
"""
from __future__ import annotations

import math
import numbers

import torch

from .attention_args import is_int

REDUCTIONS = ("mean", "sum", "none")
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_F32_MIN = float(torch.finfo(torch.float32).tiny)  # smallest normal float32
_F32_MAX = float(torch.finfo(torch.float32).max)


def check(fn: str, hidden, weight, labels, bias, *, reduction, label_smoothing, z_loss, softcap, chunk_rows,
          ignore_index, chunk_name: str = "chunk_size", allow_none_chunk: bool = True) -> None:
    """hidden (..., H) floating, weight (V, H) and bias (V,) or None of hidden's dtype, labels (...) integer,
    one device; the options as linear_cross_entropy documents them. Raises TypeError / ValueError naming
    the argument. chunk_rows: rows per chunk (None allowed where allow_none_chunk), its name chunk_name."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: 'bias' must be a torch.Tensor or None, not {type(bias).__name__}")
    if hidden.dtype not in FLOATS:
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
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, not {reduction!r}")
    check_options(fn, hidden.dtype, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                  chunk_rows=chunk_rows, ignore_index=ignore_index, chunk_name=chunk_name,
                  allow_none_chunk=allow_none_chunk)
    if hidden.numel() == 0:  # H > 0 here: no row at all
        raise ValueError(f"{fn}: 'hidden' holds no tokens")


def check_options(fn: str, dtype, *, label_smoothing, z_loss, softcap, chunk_rows, ignore_index,
                  chunk_name: str = "chunk_size", allow_none_chunk: bool = True) -> None:
    if not 0.0 <= real_number(fn, "label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    z = real_number(fn, "z_loss", z_loss)
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        cap = real_number(fn, "softcap", softcap, "None or a finite number > 0")
        if not (cap > 0.0 and math.isfinite(cap)):
            raise ValueError(f"{fn}: softcap must be None or a finite number > 0, got {softcap}")
        if dtype != torch.float64 and not _F32_MIN <= cap <= _F32_MAX:
            # float32 compute: the cap would round to 0 (no cap at all) or to infinity (NaN)
            raise ValueError(f"{fn}: softcap {softcap!r} does not fit float32, the compute dtype of {dtype} "
                             f"logits (it must be in [{_F32_MIN:.6g}, {_F32_MAX:.6g}]); use float64 inputs for it")
    if not (chunk_rows is None and allow_none_chunk) and (
            not is_int(chunk_rows) or chunk_rows <= 0):
        what = "a positive int or None" if allow_none_chunk else "a positive int"
        raise ValueError(f"{fn}: {chunk_name} must be {what}, got {chunk_rows!r}")
    if not is_int(ignore_index):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"{fn}: ignore_index must fit int64 (the dtype of the labels), got {ignore_index}")


def check_op(fn: str, hidden, weight, bias, labels, *, reduction, label_smoothing, z_loss, softcap, chunk_rows,
             ignore_index, row_scale=None) -> None:
    """The registered ops' arguments: the wrapper's rules (check) on the flattened form the wrapper passes,
    hidden (N, H) and labels (N,) int64, chunk_rows a positive int; row_scale (backward op): (N,) in the
    real dtype (float64 for float64 hidden, float32 otherwise)."""
    check(fn, hidden, weight, labels, bias, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
          softcap=softcap, chunk_rows=chunk_rows, ignore_index=ignore_index, chunk_name="chunk_rows",
          allow_none_chunk=False)
    if hidden.dim() != 2:
        raise ValueError(f"{fn}: 'hidden' must be (N, H) (the wrapper flattens the leading dimensions), got "
                         f"{tuple(hidden.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{fn}: 'labels' must be int64 (the wrapper converts), not {labels.dtype}")
    if row_scale is not None:
        real = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if not isinstance(row_scale, torch.Tensor) or row_scale.dtype != real:
            got = row_scale.dtype if isinstance(row_scale, torch.Tensor) else type(row_scale).__name__
            raise TypeError(f"{fn}: 'row_scale' must be a {real} tensor (the real dtype of 'hidden'), not {got}")
        if row_scale.shape != labels.shape or row_scale.device != hidden.device:
            raise ValueError(f"{fn}: 'row_scale' must be ({hidden.shape[0]},) on {hidden.device}, got "
                             f"{tuple(row_scale.shape)} on {row_scale.device}")


def real_number(fn: str, name: str, value, what: str = "a real number") -> float:
    """float(value) for an int / float / numpy scalar; TypeError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be {what}, not {value!r}")
    return float(value)
