"""Float64 references of seqwrap's ops, in plain torch: what each op computes, written the obvious way
(full logits, full score matrices, one recurrence step at a time), as mamba-ssm ships selective_scan_ref.

    from seqwrap.ops import reference
    loss, lse = reference.linear_cross_entropy_ref(hidden, weight, labels, label_smoothing=0.1)
    out, lse = reference.attention_ref(q, k, v, window=512, doc_ids=ids)
    y, h_last = reference.selective_scan_ref(u, dt, A, B, C, D, z, h0, seq_idx=seq_idx)

Any floating dtype goes in; everything is computed and returned in float64 (casts are differentiable,
so torch.autograd through a reference gives float64 reference gradients of the inputs). Memory and
time grow as the naive computation does (T x T scores, (N, V) logits): for tests and checks on small
sizes, not for training. The tests check each reference against an independent computation
(F.cross_entropy, F.scaled_dot_product_attention, a closed-form scan) and each op against its reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64
_M64 = (1 << 64) - 1


def _f64(t):
    return None if t is None else t.to(F64)


# -- linear cross-entropy ---------------------------------------------------------------------------------
def linear_cross_entropy_ref(hidden, weight, labels, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
                             label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None):
    """seqwrap.linear_cross_entropy in float64: hidden (..., H), weight (V, H), labels (...) integer, bias (V,).

    Per token with z = softcap * tanh(logits / softcap) (or the logits), lse = logsumexp(z), eps the smoothing:
        loss = (1 - eps) * (lse - z[label]) + eps * (lse - mean(z)) + z_loss * lse**2,  0 where label == ignore_index.
    reduction "mean" divides the sum by the number of non-ignored labels (at least 1: all ignored gives 0).
    Returns (loss: () or shaped like labels for "none", lse shaped like labels), float64."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy_ref: reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    logits = _f64(hidden) @ _f64(weight).t()
    if bias is not None:
        logits = logits + _f64(bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    keep = labels != ignore_index
    picked = logits.gather(-1, torch.where(keep, labels, 0).to(torch.int64)[..., None])[..., 0]
    per_token = (1 - label_smoothing) * (lse - picked) + label_smoothing * (lse - logits.mean(-1)) + z_loss * lse**2
    per_token = torch.where(keep, per_token, torch.zeros((), dtype=F64, device=per_token.device))
    if reduction == "none":
        return per_token, lse
    total = per_token.sum()
    if reduction == "mean":
        total = total / keep.sum().clamp(min=1).to(F64)
    return total, lse


# -- attention ---------------------------------------------------------------------------------------------
def attention_mask_ref(length: int, *, causal: bool = True, window: int | None = None, doc_ids=None,
                       key_padding=None, device=None):
    """Allowed (query, key) pairs, bool (B or 1, 1, T, T): key <= query (causal), query - key < window,
    same document (doc_ids (B, T)), key_padding[b, key] true (a real key)."""
    i = torch.arange(length, device=device)
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (i[None, :] <= i[:, None])
    if window is not None:
        allowed = allowed & ((i[:, None] - i[None, :]) < window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding.to(torch.bool)[:, None, None, :]
    return allowed


def attention_ref(q, k, v, *, causal: bool = True, window: int | None = None, scale: float | None = None,
                  doc_ids=None, key_padding=None, sinks=None, softcap: float | None = None):
    """Attention in float64 as seqwrap.ops.chunked_attention and its block primitives compute it.

    q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv), Hq a multiple of Hkv (query head h reads K/V head
    h // (Hq / Hkv)); mask as attention_mask_ref; scale default D**-0.5; softcap: scores
    softcap * tanh(s / softcap); sinks (Hq,): one extra logit per query head in the softmax denominator,
    with no value (gpt-oss). Returns (out (B, Hq, T, Dv), lse (B, Hq, T)), float64; lse includes the sink.
    A query that may see no key gets output 0 and lse -inf (the sink's logit with sinks)."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = _f64(k).repeat_interleave(groups, 1), _f64(v).repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (_f64(q) @ kk.transpose(-1, -2)) * scale                                  # (B, Hq, T, T)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = attention_mask_ref(q.shape[2], causal=causal, window=window, doc_ids=doc_ids, key_padding=key_padding,
                                 device=q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                              # -inf where no key is allowed
    if sinks is not None:
        lse = torch.logaddexp(lse, _f64(sinks).view(1, -1, 1))
    finite = torch.where(torch.isinf(lse), torch.zeros((), dtype=F64, device=lse.device), lse)
    p = torch.exp(s - finite[..., None])                                          # masked keys: exp(-inf) = 0
    return p @ vv, lse


def lse_merge_ref(acc, acc_lse, block_out, block_lse):
    """The LSE merge in float64: (acc (..., L, D), acc_lse (..., L)) and a block's (out, lse) over disjoint keys
    -> (out, lse) over both: lse = logaddexp, out = weights exp(lse_part - lse) on each part. A part with lse
    -inf contributes nothing (its output may hold anything)."""
    a, b = _f64(acc_lse), _f64(block_lse)
    lse = torch.logaddexp(a, b)
    zero = torch.zeros((), dtype=F64, device=lse.device)
    safe = torch.where(torch.isinf(lse), zero, lse)

    def part(out, part_lse):
        w = torch.where(torch.isneginf(part_lse), zero, torch.exp(part_lse - safe))
        return torch.where(torch.isneginf(part_lse)[..., None], zero, _f64(out) * w[..., None])
    return part(acc, a) + part(block_out, b), lse


# -- Kahan accumulation and the chunk sampler --------------------------------------------------------------
def kahan_accumulate_ref(accs, grads, scale: float = 1.0):
    """One step of seqwrap.kahan_accumulate_ in exact arithmetic: [acc + scale * g] in float64, with scale rounded
    to float32 first (the kernel multiplies in float32). Chaining steps from float64 accumulators gives the
    exact sum the compensated float32 accumulation approximates."""
    s = float(torch.tensor(scale, dtype=torch.float32))
    return [_f64(a) + s * _f64(g) for a, g in zip(accs, grads)]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def chunk_key(seed: int, step: int, i: int) -> int:
    """The sampler's 64-bit random key of chunk i at (seed, step): three SplitMix64 rounds."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ i)


def sample_chunks_ref(num_chunks: int, *, sampling: str = "bernoulli", probs=None, budget: int | None = None,
                      max_compensation: float | None = None, seed: int = 0, step: int = 0):
    """seqwrap.sample_chunks drawn in Python, bit for bit: bernoulli keeps chunk i when the top 53 bits of its key,
    as a uniform in [0, 1), are below probs[i] (factor 1/probs[i]); fixed keeps the `budget` chunks of smallest
    (key, i) (factor min(num_chunks / budget, max_compensation)). float64 (num_chunks,) on the CPU."""
    keys = [chunk_key(seed, step, i) for i in range(num_chunks)]
    if sampling == "bernoulli":
        q = torch.as_tensor(probs, dtype=F64).tolist()
        w = [1.0 / q[i] if (keys[i] >> 11) / 2.0**53 < q[i] else 0.0 for i in range(num_chunks)]
    elif sampling == "fixed":
        kept = set(sorted(range(num_chunks), key=lambda i: (keys[i], i))[:budget])
        f = num_chunks / budget if max_compensation is None else min(num_chunks / budget, float(max_compensation))
        w = [f if i in kept else 0.0 for i in range(num_chunks)]
    else:
        raise ValueError(f"sample_chunks_ref: sampling must be 'bernoulli' or 'fixed', not {sampling!r}")
    return torch.tensor(w, dtype=F64)


def sample_chunks_expectation(num_chunks: int, *, sampling: str = "bernoulli", probs=None, budget: int | None = None,
                              max_compensation: float | None = None):
    """E[weights] over the draw, float64 (num_chunks,): 1 for every chunk under bernoulli (q * 1/q: each chunk's own
    loss is unbiased); budget / num_chunks * min(num_chunks / budget, max_compensation) under fixed (1 without a
    binding cap). Paths through several chunks are unbiased under bernoulli only (see seqwrap.sample_chunks)."""
    if sampling == "bernoulli":
        q = torch.as_tensor(probs, dtype=F64)
        return q * (1.0 / q)
    if sampling == "fixed":
        f = num_chunks / budget if max_compensation is None else min(num_chunks / budget, float(max_compensation))
        return torch.full((num_chunks,), budget / num_chunks * f, dtype=F64)
    raise ValueError(f"sample_chunks_expectation: sampling must be 'bernoulli' or 'fixed', not {sampling!r}")


# -- scans -------------------------------------------------------------------------------------------------
def _starts(reset, seq_idx, batch: int, length: int, device):
    """(batch, length) bool: a document starts at step t (the state before t is dropped), or None."""
    if reset is not None and seq_idx is not None:
        raise TypeError("pass reset or seq_idx, not both")
    if seq_idx is not None:
        out = torch.zeros(batch, length, dtype=torch.bool, device=device)
        out[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        return out
    return None if reset is None else reset != 0


def selective_scan_ref(u, dt, A, B, C, D=None, z=None, h0=None, *, reset=None, seq_idx=None):
    """The Mamba-1 selective scan, one step at a time, float64; shapes as seqwrap.ops.selective_scan:
    u, dt, z (batch, dim, len); A (dim, dstate); B, C (batch, dstate, len); D (dim,); h0 (batch, dim, dstate).

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t     (h_{-1} = h0 or 0; h_{t-1} = 0 where a document starts)
        y_t = (C_t . h_t + D * u_t) * silu(z_t)

    reset (batch, len) nonzero where a document starts (at t = 0 it drops h0), or seq_idx (batch, len): a
    document starts where it changes. Returns (y (batch, dim, len), h_last (batch, dim, dstate))."""
    u_, dt_, A_, B_, C_ = _f64(u), _f64(dt), _f64(A), _f64(B), _f64(C)
    batch, dim, length = u.shape
    starts = _starts(reset, seq_idx, batch, length, u.device)
    h = _f64(h0) if h0 is not None else u_.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        if starts is not None:
            h = h * (~starts[:, t]).to(F64)[:, None, None]
        h = torch.exp(dt_[:, :, t, None] * A_) * h + dt_[:, :, t, None] * B_[:, None, :, t] * u_[:, :, t, None]
        ys.append((h * C_[:, None, :, t]).sum(-1))                                # (batch, dim)
    y = torch.stack(ys, -1) if ys else u_.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + _f64(D)[None, :, None] * u_
    if z is not None:
        y = y * F.silu(_f64(z))
    return y, h


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, h0=None, *, reset=None, seq_idx=None):
    """The Mamba-2 (SSD) scan, one step at a time, float64; shapes as seqwrap.ops.ssd_scan: x, z (batch, len, heads,
    headdim); dt (batch, len, heads); A, D (heads,); B, C (batch, len, groups, dstate), head h reading group
    h // (heads / groups); h0 (batch, heads, headdim, dstate).

        s_t = exp(dt_t * A) * s_{t-1} + dt_t * x_t B_t^T     (s_{-1} = h0 or 0; 0 before a document start)
        y_t = (s_t C_t + D * x_t) * silu(z_t)

    reset / seq_idx (batch, len) as selective_scan_ref. Returns (y (batch, len, heads, headdim), final state)."""
    x_, dt_, A_ = _f64(x), _f64(dt), _f64(A)
    batch, length, heads, headdim = x.shape
    rep = heads // B.shape[2]
    B_ = _f64(B).repeat_interleave(rep, dim=2)                                    # (batch, len, heads, dstate)
    C_ = _f64(C).repeat_interleave(rep, dim=2)
    starts = _starts(reset, seq_idx, batch, length, x.device)
    s = _f64(h0) if h0 is not None else x_.new_zeros(batch, heads, headdim, B.shape[3])
    ys = []
    for t in range(length):
        if starts is not None:
            s = s * (~starts[:, t]).to(F64)[:, None, None, None]
        a = torch.exp(dt_[:, t] * A_)                                             # (batch, heads)
        s = a[..., None, None] * s + (dt_[:, t, :, None] * x_[:, t])[..., None] * B_[:, t, :, None, :]
        ys.append((s * C_[:, t, :, None, :]).sum(-1))                             # (batch, heads, headdim)
    y = torch.stack(ys, 1) if ys else x_.new_zeros(batch, 0, heads, headdim)
    if D is not None:
        y = y + _f64(D)[:, None] * x_
    if z is not None:
        y = y * F.silu(_f64(z))
    return y, s


__all__ = ["attention_mask_ref", "attention_ref", "chunk_key", "kahan_accumulate_ref", "linear_cross_entropy_ref",
           "lse_merge_ref", "sample_chunks_expectation", "sample_chunks_ref", "selective_scan_ref", "ssd_scan_ref"]
