"""The argument rules of the chunked attention, one set of functions for the public wrapper
(seqwrap.ops.chunked_attention) and for the implementations of the registered ops
(torch.ops.seqwrap.chunked_attention / _backward), which a compiled graph calls directly.

`check` and `check_doc_ids` look at shapes, dtypes, devices and Python scalars only, so the ops' fake
implementations run them too and a bad call is refused while torch.compile traces. `check_doc_order`
reads the values of doc_ids (non-decreasing along each row): only the op implementations run it, on
the host copy they make anyway, so it is opaque to the compiler and a fullgraph trace is not broken.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_int(x) -> bool:
    """A Python int (not a bool), or the symbolic int torch.compile passes for one under dynamic shapes."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check(fn: str, q, k, v, *, chunk, causal, window, scale, chunk_name: str = "chunk_size") -> None:
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), one floating dtype and device, Hq a multiple of Hkv (Hkv 0
    only with Hq 0); chunk a positive int (named chunk_name); causal a bool; window None or a positive
    int, with causal=True; scale None or a finite real number. Raises TypeError / ValueError naming
    the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, not {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: '{name}' must be (batch, heads, T, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{fn}: '{name}' has dtype {t.dtype}; expected a floating dtype")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must share dtype and device")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{fn}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(q: (B, Hq, T, D); k, v: (B, Hkv, T, D))")
    if (k.shape[1] == 0 and q.shape[1] != 0) or (k.shape[1] != 0 and q.shape[1] % k.shape[1]):
        raise ValueError(f"{fn}: q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if not is_int(chunk) or chunk <= 0:
        raise ValueError(f"{fn}: {chunk_name} must be a positive int, got {chunk!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {causal!r}")
    if window is not None and (not causal or not is_int(window) or window <= 0):
        raise ValueError(f"{fn}: window must be a positive int and needs causal=True, got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{fn}: scale must be None or a real number, not {scale!r}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{fn}: scale must be finite, got {scale!r}")


def check_doc_ids(fn: str, doc_ids, q) -> None:
    """doc_ids: None or an integer (B, T) tensor on q's device (q (B, Hq, T, D)): the document of every token."""
    if doc_ids is None:
        return
    if not isinstance(doc_ids, torch.Tensor):
        raise TypeError(f"{fn}: 'doc_ids' must be a torch.Tensor or None, not {type(doc_ids).__name__}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: 'doc_ids' must hold integer document ids, not {doc_ids.dtype}")
    want = (q.shape[0], q.shape[2])
    if tuple(doc_ids.shape) != want:
        raise ValueError(f"{fn}: 'doc_ids' must be (batch, T) = {want}, one id per token (no broadcasting), got "
                         f"{tuple(doc_ids.shape)}")
    if doc_ids.device != q.device:
        raise ValueError(f"{fn}: 'doc_ids' is on {doc_ids.device}, q on {q.device}")


def check_doc_order(fn: str, documents) -> None:
    """The documents' ids (a seqwrap.ops.documents.Documents) non-decreasing along each row: every document one
    contiguous span of tokens (the block decisions compare the ids at span ends only)."""
    where = documents.decreasing_at()
    if where is not None:
        b, t = where
        raise ValueError(f"{fn}: 'doc_ids' must be non-decreasing along each row (every document one contiguous "
                         f"span of tokens); row {b} goes from {documents.id_at(b, t)} to {documents.id_at(b, t + 1)} "
                         f"at token {t + 1}")


def check_backward(fn: str, dout, q, out, lse) -> None:
    """dout and out shaped and typed like q (B, Hq, T, D); lse (B, Hq, T) in the real dtype of q (float64 for
    float64, float32 otherwise); all on q's device."""
    real = torch.float64 if q.dtype == torch.float64 else torch.float32
    for name, t, shape, dtype in (("dout", dout, q.shape, q.dtype), ("out", out, q.shape, q.dtype),
                                  ("lse", lse, q.shape[:3], real)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, not {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{fn}: '{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{fn}: '{name}' has dtype {t.dtype}; expected {dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: '{name}' is on {t.device}, q on {q.device}")
