"""Chunked causal attention with online-softmax (LSE) merging, exact in forward and backward.

    out = seqwrap.ops.chunked_attention(q, k, v, chunk_size=1024)   # == F.scaled_dot_product_attention(q, k, v, is_causal=True)

q (batch, q_heads, T, head_dim); k, v (batch, kv_heads, T, head_dim), q_heads a
multiple of kv_heads (grouped-query attention). The sequence is cut into chunks;
each q chunk attends to the k/v chunks at or before it (only those inside the
sliding window, when one is given), one (q chunk, kv chunk) block at a time.
Block results (output, log-sum-exp) are merged by the C/CUDA LSE merge kernel
into a float32 (float64 for float64 input) accumulator. The backward runs per
block from the final output and the global LSE, so no block's probabilities
are ever stored: memory is O(T * head_dim) plus one block.

Blocks run on torch's fused attention kernel that exposes the LSE
(aten::_scaled_dot_product_flash_attention_for_cpu and its backward) on CPU;
other devices use a plain-torch block (matmul + logsumexp), exact but without
the fused kernel's speed.
"""
from __future__ import annotations

import torch

from .._ext import C
from ._stream import stream_for


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D), each kv head repeated for its group of q heads."""
    if groups == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _reduce_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, n, d = g.shape
    return g.reshape(b, h // groups, groups, n, d).sum(2)


def _block_mask(q0, q1, k0, k1, causal, window, dtype, device):
    """None if every (q, k) pair of the block is allowed, "empty" if none is, else an additive
    (q1-q0, k1-k0) mask (0 allowed, -inf masked). Allowed: k <= q (causal) and q - k < window."""
    lo_gap, hi_gap = q0 - (k1 - 1), (q1 - 1) - k0  # smallest and largest q - k in the block
    if (causal and hi_gap < 0) or (window is not None and lo_gap >= window):
        return "empty"
    if (not causal or lo_gap >= 0) and (window is None or hi_gap < window):
        return None
    qi = torch.arange(q0, q1, device=device)[:, None]
    ki = torch.arange(k0, k1, device=device)[None, :]
    allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if causal:
        allowed &= ki <= qi
    if window is not None:
        allowed &= (qi - ki) < window
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def _fused_available(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _block_forward(q, k, v, mask, scale):
    """Attention of q over one k/v block: (out (B,H,Tq,D) in q.dtype, lse (B,H,Tq) real)."""
    if _fused_available(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        if mask is not None:  # the fused kernel reports lse 0 (not -inf) for a row with every key masked
            lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        return out, lse
    real = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(real), k.to(real).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(real)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.to(real)).to(q.dtype), lse


def _block_backward(dout, q, k, v, out, lse, mask, scale):
    """Gradients of one block's contribution, from the final output and the global lse."""
    if _fused_available(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32), 0.0, False,
            attn_mask=mask, scale=scale)
    real = lse.dtype
    qr, kr, vr, dor = q.to(real), k.to(real), v.to(real), dout.to(real)
    s = torch.matmul(qr, kr.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(real)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                 # (B,H,Tq,Tk) block probabilities
    dv = torch.matmul(p.transpose(-1, -2), dor)
    dp = torch.matmul(dor, vr.transpose(-1, -2))
    delta = (dor * out.to(real)).sum(-1, keepdim=True)                # rowsum(dO * O), global O
    ds = p * (dp - delta) * scale
    return torch.matmul(ds, kr).to(q.dtype), torch.matmul(ds.transpose(-1, -2), qr).to(k.dtype), dv.to(v.dtype)


def _blocks(t, chunk, causal, window, dtype, device):
    """Yields (q0, q1, [(k0, k1, mask), ...]) over q chunks, skipping empty blocks."""
    for q0 in range(0, t, chunk):
        q1 = min(t, q0 + chunk)
        kv = []
        for k0 in range(0, t, chunk):
            k1 = min(t, k0 + chunk)
            mask = _block_mask(q0, q1, k0, k1, causal, window, dtype, device)
            if not (isinstance(mask, str) and mask == "empty"):
                kv.append((k0, k1, mask))
        yield q0, q1, kv


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk, causal, window, scale):
        b, hq, t, d = q.shape
        groups = hq // k.shape[1]
        real = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, t, dtype=real, device=q.device)
        stream = stream_for(q)
        for q0, q1, kv in _blocks(t, chunk, causal, window, q.dtype, q.device):
            acc = torch.zeros(b, hq, q1 - q0, d, dtype=real, device=q.device)
            acc_lse = torch.full((b, hq, q1 - q0), float("-inf"), dtype=real, device=q.device)
            qc = q[:, :, q0:q1]
            for k0, k1, mask in kv:
                bo, bl = _block_forward(qc, _expand_kv(k[:, :, k0:k1], groups), _expand_kv(v[:, :, k0:k1], groups), mask, scale)
                C.lse_merge(acc, acc_lse, bo.contiguous(), bl.to(real).contiguous(), stream)
            out[:, :, q0:q1] = acc.to(q.dtype)
            lse[:, :, q0:q1] = acc_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (chunk, causal, window, scale, groups)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        chunk, causal, window, scale, groups = ctx.config
        t = q.shape[2]
        dq = torch.zeros_like(q, dtype=lse.dtype)
        dk = torch.zeros(k.shape, dtype=lse.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=lse.dtype, device=v.device)
        dout = dout.contiguous()
        for q0, q1, kv in _blocks(t, chunk, causal, window, q.dtype, q.device):
            qc, oc, lc, gc = q[:, :, q0:q1], out[:, :, q0:q1], lse[:, :, q0:q1], dout[:, :, q0:q1]
            for k0, k1, mask in kv:
                gq, gk, gv = _block_backward(gc, qc, _expand_kv(k[:, :, k0:k1], groups),
                                             _expand_kv(v[:, :, k0:k1], groups), oc, lc, mask, scale)
                dq[:, :, q0:q1] += gq
                dk[:, :, k0:k1] += _reduce_kv_grad(gk, groups)
                dv[:, :, k0:k1] += _reduce_kv_grad(gv, groups)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def chunked_attention(q, k, v, *, chunk_size: int, causal: bool = True, window: int | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Exact attention computed block by block (see the module docstring). Returns (B, Hq, T, D)."""
    fn = "seqwrap.ops.chunked_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, not {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: '{name}' must be (batch, heads, T, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{fn}: '{name}' has dtype {t.dtype}; expected a floating dtype")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must share dtype and device")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{fn}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "(q: (B, Hq, T, D); k, v: (B, Hkv, T, D))")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{fn}: q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    if window is not None and (not causal or isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"{fn}: window must be a positive int and needs causal=True, got {window!r}")
    if q.shape[2] == 0:
        raise ValueError(f"{fn}: the sequence is empty")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _ChunkedAttention.apply(q, k, v, chunk_size, causal, window, scale)
