"""Block primitives of exact attention computed block by block with online-softmax (LSE) merging.

A query chunk q (B, Hq, Lq, D) attends to a list of key/value blocks k, v (B, Hkv, Lk, D)
(Hq a multiple of Hkv: grouped-query attention, run with the query heads that share a K/V head
stacked as rows, so no block's K/V is ever expanded). `attend` runs one block at a time and
merges the blocks' (output, log-sum-exp) pairs with the C/CUDA LSE merge kernel into a float32
(float64 for float64 input) accumulator; `BlockBackward` gives each block's share of dq, dk, dv
from the *final* output and the *global* lse, so no block's probabilities are ever kept.

Value heads may have another size than query/key heads: q, k (.., D), v (.., Dv), outputs (.., Dv)
(MiMo-V2-Flash). Attention sinks (gpt-oss `s_aux`: one extra logit per query head in the softmax
denominator, with no value) are folded in after the blocks' merge, as one more block whose output is
0 and whose lse is the sink (`fold_sinks`); the block backwards then see the final output and the
global lse (sink included), and the sinks' own gradient comes from `sinks_grad`.

Masks are additive float tensors broadcastable to (B, Hq, Lq, Lk) (0 allowed, -inf masked), or
None when every pair of the block is allowed; `block_mask` builds them from positions (causal,
sliding window, key padding) and says when a block is empty so it can be skipped.

Blocks run on torch's fused attention kernels that return the LSE: on CPU
aten::_scaled_dot_product_flash_attention_for_cpu (any float dtype), on CUDA
aten::_scaled_dot_product_efficient_attention (float32/16, bfloat16; additive bias), each with its
backward. float64 on CUDA, a logit soft-cap (Gemma2: cap * tanh(s / cap)) and value heads of another
size than the query/key heads use a plain-torch block (matmul + logsumexp), exact but slower.
"""
from __future__ import annotations

import torch

from . import library
from .dtypes import real_dtype

EMPTY = "empty"  # block_mask's answer for a block in which no (q, k) pair is allowed


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
    if pad is not None:  # (positional emptiness was decided above, without a device sync)
        allowed = allowed & pad[:, None, None, :]
        if not bool(allowed.any()):
            return EMPTY
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def _fused_available(q: torch.Tensor, softcap) -> bool:
    return q.device.type == "cpu" and softcap is None


def _same_head_dim(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether v's head size equals q's (and k's). The fused CPU kernel refuses other value sizes ("Q/K/V
    should have the same head size"); the CUDA efficient kernel is only used (and tested) with equal
    sizes. Blocks with a value head size Dv != D therefore take the plain-torch block, chosen by shape."""
    return v.shape[-1] == q.shape[-1]


# CUDA: torch's memory-efficient attention kernel returns the lse and takes an additive bias.
# It runs float32/float16/bfloat16 with head_dim a multiple of 8 (4 for float32); float64 and a
# soft-cap use the plain-torch block. A call of the fused kernel that raises a RuntimeError (an
# out-of-memory error, or an older or newer torch with another signature) is redone by the
# plain-torch block, with a warning, for that call only: the next call tries the fused kernel
# again. Only the exception is handled: a result the fused kernel returns is used as it is, and
# an error of the plain-torch block propagates.


def _cuda_fused_available(q: torch.Tensor, softcap) -> bool:
    if not (q.is_cuda and softcap is None):
        return False
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.shape[-1] % 8 == 0
    return q.dtype == torch.float32 and q.shape[-1] % 4 == 0


def _cuda_fused_failed(err: Exception, which: str) -> None:
    import warnings

    warnings.warn(f"seqwrap: torch's fused CUDA attention block ({which}) failed for this call ({err}); this call "
                  "uses the plain-torch block (exact, slower); the next call tries the fused kernel again",
                  RuntimeWarning, stacklevel=3)


def _cuda_bias(mask, q):
    """The efficient kernel's bias: (B, H, Lq, Lk) in q's dtype, last dim stored padded to 16."""
    if mask is None:
        return None
    m = mask.to(q.dtype)
    lk = m.shape[-1]
    buf = m.new_empty(*m.shape[:-1], (lk + 15) // 16 * 16)
    buf[..., :lk] = m
    return buf[..., :lk].expand(q.shape[0], q.shape[1], q.shape[2], lk)


def _cuda_block_forward(q, k, v, mask, scale):
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, _cuda_bias(mask, q), True, 0.0, False, scale=scale)
    lse = lse[..., :q.shape[2]]  # stored padded to a multiple of 32 rows
    if mask is not None:  # a row with every key masked reports lse 0: make it -inf
        lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
    return out, lse


def _cuda_block_backward(dout, q, k, v, out, lse, mask, scale):
    lq = q.shape[2]
    padded = torch.full((*lse.shape[:2], (lq + 31) // 32 * 32), float("inf"), dtype=torch.float32, device=q.device)
    padded[..., :lq] = lse
    no_rng = torch.zeros((), dtype=torch.int64)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.to(q.dtype), q, k, v, _cuda_bias(mask, q), out.to(q.dtype), padded, no_rng, no_rng, 0.0,
        [True, True, True, False], False, scale=scale)
    return dq, dk, dv


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
    """Attention of q (B,H,Lq,D) over one block k (B,H,Lk,D), v (B,H,Lk,Dv) (same head count).
    Returns (out (B,H,Lq,Dv) in q.dtype, lse (B,H,Lq) real); rows with every key masked: lse -inf."""
    same = _same_head_dim(q, v)  # Dv != D: the plain-torch block (see _same_head_dim)
    if same and _cuda_fused_available(q, softcap):
        try:
            return _cuda_block_forward(q, k, v, mask, scale)
        except RuntimeError as err:  # this call only (see _cuda_fused_available)
            _cuda_fused_failed(err, "forward")
    if same and _fused_available(q, softcap):
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
    (prepared by backward_lse; with sinks, both after fold_sinks). q, k (B,H,L,D), v, dout, out
    (B,H,L,Dv), the same head count."""
    same = _same_head_dim(q, v)  # Dv != D: the plain-torch block (see _same_head_dim)
    if same and _cuda_fused_available(q, softcap):
        try:
            return _cuda_block_backward(dout, q, k, v, out, lse, mask, scale)
        except RuntimeError as err:  # this call only (see _cuda_fused_available)
            _cuda_fused_failed(err, "backward")
    if same and _fused_available(q, softcap):
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


def group_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, ...) -> (B, Hkv, G * L, ...), G = Hq / Hkv: the G query heads that share a K/V
    head become extra rows of it (q head h uses K/V head h // G, as HF's repeat_kv), so a block
    needs no expanded copy of its K/V."""
    b, hq, n = x.shape[:3]
    return x.reshape(b, kv_heads, (hq // kv_heads) * n, *x.shape[3:])


def ungroup_queries(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Inverse of group_queries: (B, Hkv, G * L, ...) -> (B, Hq, L, ...)."""
    b, hkv, gn = x.shape[:3]
    return x.reshape(b, q_heads, gn // (q_heads // hkv), *x.shape[3:])


def _group_mask(mask, groups: int):
    """A block mask (b, 1, Lq, Lk) for grouped query rows: (b, 1, G * Lq, Lk)."""
    if mask is None or groups == 1:
        return mask
    return mask.repeat(1, 1, groups, 1)


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Folds per-head attention sinks into a merged result, as one more block with output 0 and lse sink_h.

    out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) real, the merge over every key block; sinks (Hq,).
    Returns (out * exp(lse - lse'), lse') with lse' = logaddexp(lse, sink_h): the softmax over
    [keys, sink] without the sink's (absent) value, as HF's eager attention with s_aux computes it
    (their max-subtraction only shifts every logit of a row, so it changes nothing exact). A row that
    sees no key (lse -inf) gets output 0 and lse' = sink_h."""
    sink = sinks.to(lse.dtype).view(1, -1, 1)           # (1, Hq, 1)
    folded = torch.logaddexp(lse, sink)                   # (B, Hq, Lq), finite
    return out * torch.exp(lse - folded)[..., None], folded


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Gradient of the sinks (Hq,) in lse's dtype, from dout, out (B, Hq, Lq, Dv) (out the final output,
    after fold_sinks) and the global lse (B, Hq, Lq) (after fold_sinks).

    The sink's probability in row i is p_i = exp(sink_h - lse'_i) and its value is 0, so
    d sink_h = sum over batch and rows of p_i * (0 - rowsum(dO * O')_i)."""
    real = lse.dtype
    delta = (dout.to(real) * out.to(real)).sum(-1)        # (B, Hq, Lq) rowsum(dO * O')
    p_sink = torch.exp(sinks.to(real).view(1, -1, 1) - lse)
    return -(p_sink * delta).sum(dim=(0, 2))


def attend(q: torch.Tensor, blocks, scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None,
           value_dim: int | None = None):
    """Exact attention of q (B, Hq, Lq, D) over `blocks`, an iterable of (k, v, mask) with k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) and mask as block_mask gives it (EMPTY blocks must not be passed).
    sinks: (Hq,) per-head sink logits (gpt-oss s_aux) or None. value_dim: Dv, needed only when `blocks`
    may be empty (default D).
    Returns (out (B, Hq, Lq, Dv) in q.dtype, lse (B, Hq, Lq) real); with sinks the lse includes them,
    which is the lse BlockBackward and sinks_grad need."""
    b, hq, lq, d = q.shape
    real = real_dtype(q.dtype)
    qg = acc = acc_lse = None
    for k, v, mask in blocks:
        if qg is None:
            qg = group_queries(q, k.shape[1])                                          # (B, Hkv, G*Lq, D)
            acc = torch.zeros(*qg.shape[:3], v.shape[-1], dtype=real, device=q.device)  # (B, Hkv, G*Lq, Dv)
            acc_lse = torch.full(qg.shape[:3], float("-inf"), dtype=real, device=q.device)
        bo, bl = block_forward(qg, k, v, _group_mask(mask, qg.shape[2] // lq), scale, softcap)
        library.lse_merge(acc, acc_lse, bo.contiguous(), bl.to(real).contiguous())
    if qg is None:  # no key at all
        dv = d if value_dim is None else value_dim
        out = torch.zeros(b, hq, lq, dv, dtype=real, device=q.device)
        lse = torch.full((b, hq, lq), float("-inf"), dtype=real, device=q.device)
    else:
        out, lse = ungroup_queries(acc, hq), ungroup_queries(acc_lse, hq)
    if sinks is not None:  # in the real dtype, before the cast of the output
        out, lse = fold_sinks(out, lse, sinks)
    return out.to(q.dtype), lse


class BlockBackward:
    """Block-by-block backward of `attend` for one query chunk, from its final output and lse.

    dout, out: (B, Hq, Lq, Dv); q: (B, Hq, Lq, D); lse: (B, Hq, Lq) as attend returned it (with the
    sinks folded in, if any); kv_heads: Hkv; sinks: the (Hq,) sink logits attend got, or None.
    block(k, v, mask) returns that block's (dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv)) in the real dtype
    and adds its share of dq, which dq() returns (B, Hq, Lq, D) in the real dtype; sinks_grad() gives
    the sinks' gradient (Hq,) in the real dtype.
    """

    def __init__(self, dout, q, out, lse, kv_heads: int, scale: float, softcap: float | None = None,
                 sinks: torch.Tensor | None = None):
        self.hq, self.lq = q.shape[1], q.shape[2]
        self.groups = self.hq // kv_heads
        self.q, self.out = group_queries(q, kv_heads), group_queries(out, kv_heads)
        self.dout = group_queries(dout.contiguous(), kv_heads)
        self.lse = group_queries(backward_lse(lse), kv_heads)
        self.scale, self.softcap = scale, softcap
        self._dq = torch.zeros(self.q.shape, dtype=lse.dtype, device=q.device)
        self._sinks = None if sinks is None else (dout, out, lse, sinks)

    def block(self, k, v, mask):
        gq, gk, gv = block_backward(self.dout, self.q, k, v, self.out, self.lse, _group_mask(mask, self.groups),
                                    self.scale, self.softcap)
        real = self._dq.dtype
        self._dq += gq.to(real)
        return gk.to(real), gv.to(real)

    def dq(self) -> torch.Tensor:
        return ungroup_queries(self._dq, self.hq)

    def sinks_grad(self) -> torch.Tensor:
        if self._sinks is None:
            raise RuntimeError("BlockBackward.sinks_grad: attend ran without sinks")
        return sinks_grad(*self._sinks)
