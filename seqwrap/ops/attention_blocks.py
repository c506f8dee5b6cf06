"""Block primitives of exact attention computed block by block with online-softmax (LSE) merging.

A query chunk q (B, Hq, Lq, D) attends to a list of key/value blocks k, v (B, Hkv, Lk, D)
(Hq a multiple of Hkv: grouped-query attention). `attend` runs one block at a time and merges
the blocks' (output, log-sum-exp) pairs with the C/CUDA LSE merge kernel into a float32 (float64
for float64 input) accumulator; `attend_block_backward` gives one block's share of dq, dk, dv
from the *final* output and the *global* lse, so no block's probabilities are ever kept.

Masks are additive float tensors broadcastable to (B, Hq, Lq, Lk) (0 allowed, -inf masked), or
None when every pair of the block is allowed; `block_mask` builds them from positions (causal,
sliding window, key padding) and says when a block is empty so it can be skipped.

Blocks run on torch's fused CPU attention kernel that returns the LSE
(aten::_scaled_dot_product_flash_attention_for_cpu and its backward); elsewhere, and with a
logit soft-cap (Gemma2: cap * tanh(s / cap)), on a plain-torch block (matmul + logsumexp).
"""
from __future__ import annotations

import torch

from .._ext import C
from ._stream import stream_for

EMPTY = "empty"  # block_mask's answer for a block in which no (q, k) pair is allowed


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of attention in `dtype`: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D), each kv head repeated for its group of q heads."""
    if groups == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def reduce_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of expand_kv for gradients: (B, Hkv * groups, L, D) -> (B, Hkv, L, D), summed per group."""
    if groups == 1:
        return g
    b, h, n, d = g.shape
    return g.reshape(b, h // groups, groups, n, d).sum(2)


def block_mask(q0: int, q1: int, k0: int, k1: int, *, causal: bool = True, window: int | None = None,
               key_padding: torch.Tensor | None = None, dtype=torch.float32, device="cpu"):
    """Mask of queries at positions [q0, q1) over keys at positions [k0, k1).

    Allowed: k <= q (causal), q - k < window (sliding window), key_padding[b, k] true (key
    padding, a (B, >= k1) bool tensor over absolute positions). Returns EMPTY if no pair is
    allowed, None if every pair is, else an additive (1 or B, 1, q1-q0, k1-k0) mask.
    """
    lo_gap, hi_gap = q0 - (k1 - 1), (q1 - 1) - k0  # smallest and largest q - k in the block
    if (causal and hi_gap < 0) or (window is not None and lo_gap >= window):
        return EMPTY
    positional = not ((not causal or lo_gap >= 0) and (window is None or hi_gap < window))
    pad = None if key_padding is None else key_padding[:, k0:k1].to(device=device, dtype=torch.bool)
    if pad is not None and bool(pad.all()):
        pad = None
    if not positional and pad is None:
        return None
    allowed = torch.ones(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
    if positional:
        qi = torch.arange(q0, q1, device=device)[:, None]
        ki = torch.arange(k0, k1, device=device)[None, :]
        if causal:
            allowed = allowed & (ki <= qi)
        if window is not None:
            allowed = allowed & ((qi - ki) < window)
    if pad is not None:
        allowed = allowed & pad[:, None, None, :]
    if not bool(allowed.any()):
        return EMPTY
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def _fused_available(q: torch.Tensor, softcap) -> bool:
    return q.device.type == "cpu" and softcap is None


def _scores(q, k, mask, scale, softcap, real):
    """Block scores in `real`: (scale * q k^T, soft-capped), plus the mask; and tanh(.) for the cap's backward."""
    s = torch.matmul(q.to(real), k.to(real).transpose(-1, -2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if mask is not None:
        s = s + mask.to(real)
    return s, t


def block_forward(q, k, v, mask, scale: float, softcap: float | None = None):
    """Attention of q (B,H,Lq,D) over one k/v block (B,H,Lk,D) (already expanded to H heads).
    Returns (out (B,H,Lq,D) in q.dtype, lse (B,H,Lq) real); rows with every key masked: lse -inf."""
    if _fused_available(q, softcap):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                            scale=scale)
        if mask is not None:  # the fused kernel reports lse 0 (not -inf) for a row with every key masked
            lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        return out, lse
    real = real_dtype(q.dtype)
    s, _ = _scores(q, k, mask, scale, softcap, real)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(p, v.to(real)).to(q.dtype), lse


def block_backward(dout, q, k, v, out, lse, mask, scale: float, softcap: float | None = None):
    """One block's share of (dq, dk, dv), from the final output `out` and the global `lse`
    (prepared by backward_lse). Heads already expanded; dk, dv per expanded head."""
    if _fused_available(q, softcap):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    real = lse.dtype
    qr, kr, dor = q.to(real), k.to(real), dout.to(real)
    s, t = _scores(q, k, mask, scale, softcap, real)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                 # (B,H,Lq,Lk) block probabilities
    dv = torch.matmul(p.transpose(-1, -2), dor)
    dp = torch.matmul(dor, v.to(real).transpose(-1, -2))
    delta = (dor * out.to(real)).sum(-1, keepdim=True)                # rowsum(dO * O), global O
    ds = p * (dp - delta)
    if t is not None:                                                 # d(cap * tanh(x / cap))/dx = 1 - tanh^2
        ds = ds * (1 - t * t)
    ds = ds * scale
    return torch.matmul(ds, kr).to(q.dtype), torch.matmul(ds.transpose(-1, -2), qr).to(k.dtype), dv.to(v.dtype)


def backward_lse(lse: torch.Tensor) -> torch.Tensor:
    """The global lse as block backwards need it: rows that saw no key at all (lse -inf, output 0)
    get +inf, so exp(s - lse) = 0 and they contribute no gradient."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def attend(q: torch.Tensor, blocks, scale: float, softcap: float | None = None):
    """Exact attention of q (B, Hq, Lq, D) over `blocks`, an iterable of (k, v, mask) with k, v
    (B, Hkv, Lk, D) and mask as block_mask gives it (EMPTY blocks must not be passed).
    Returns (out (B, Hq, Lq, D) in q.dtype, lse (B, Hq, Lq) real)."""
    b, hq, lq, d = q.shape
    real = real_dtype(q.dtype)
    acc = torch.zeros(b, hq, lq, d, dtype=real, device=q.device)
    acc_lse = torch.full((b, hq, lq), float("-inf"), dtype=real, device=q.device)
    stream = stream_for(q)
    for k, v, mask in blocks:
        groups = hq // k.shape[1]
        bo, bl = block_forward(q, expand_kv(k, groups), expand_kv(v, groups), mask, scale, softcap)
        C.lse_merge(acc, acc_lse, bo.contiguous(), bl.to(real).contiguous(), stream)
    return acc.to(q.dtype), acc_lse


def attend_block_backward(dout, q, k, v, out, lse_b, mask, scale: float, softcap: float | None = None):
    """block_backward for unexpanded k, v (B, Hkv, Lk, D): returns (dq real, dk, dv (B, Hkv, Lk, D) real)."""
    groups = q.shape[1] // k.shape[1]
    gq, gk, gv = block_backward(dout, q, expand_kv(k, groups), expand_kv(v, groups), out, lse_b, mask, scale, softcap)
    real = lse_b.dtype
    return gq.to(real), reduce_kv_grad(gk.to(real), groups), reduce_kv_grad(gv.to(real), groups)
