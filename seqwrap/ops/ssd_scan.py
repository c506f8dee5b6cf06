"""Mamba-2 (SSD) scan as an autograd op on the C/CUDA core.

Per head h (scalar A[h]), head channel p and state n, with g the head's B/C group:

    s_t[p, n] = exp(dt_t[h] * A[h]) * s_{t-1}[p, n] + dt_t[h] * B_t[g, n] * x_t[h, p]     s_{-1} = h0 (or 0)
    y_t[h, p] = (sum_n C_t[g, n] * s_t[p, n] + D[h] * x_t[h, p]) * silu(z_t[h, p])

Shapes as in mamba-ssm's mamba_chunk_scan_combined: x, z: (batch, len, heads, headdim);
dt: (batch, len, heads); A, D: (heads,); B, C: (batch, len, groups, dstate) with heads % groups == 0;
h0 and the final state: (batch, heads, headdim, dstate).

`dt` is the positive step, softplus (and any clamp) already applied, as HF's Mamba2 mixers form
it before their chunk scan: pass `softplus(dt_raw + dt_bias)` yourself.

The result is the same recurrence HF's `mamba2_chunk_scan` (the SSD "chunked" form) computes; the
kernel runs it as a sequential scan per (batch, head, channel) row, storing the state every `block`
steps; the backward recomputes inside each block and runs the adjoint backwards, giving gradients
for x, dt, A, B, C, D, z and h0 and accepting a gradient on the final state. Memory is
O(len * heads * headdim) for y plus the block checkpoints, never (len x chunk) matrices.

Precision: float64 inputs compute in float64, everything else (float32, float16, bfloat16 inputs)
in float32. y comes back in x's dtype, the final state in the compute dtype.

Mamba-1's selective scan is the special case groups = 1 per call with A broadcast over the state
and dt over the channels (tests/test_ssd_scan.py checks the two kernels against each other); the
SSD kernel exploits the scalar A (one exp per step and head instead of one per state entry).
"""
from __future__ import annotations

import torch

from .._ext import C as _C
from ._stream import stream_for

DEFAULT_BLOCK = 64
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FN = "seqwrap.ssd_scan"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _work(x: torch.Tensor, dstate: int, block: int, comp: torch.dtype):
    if not x.is_cuda:
        return None
    batch, _, heads, headdim = x.shape
    return torch.empty(batch * heads * headdim * (block + 2) * dstate, dtype=comp, device=x.device)


class _SSDScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, block):
        comp = _compute_dtype(x)
        batch, length, heads, headdim = x.shape
        dstate = B.shape[-1] if B.dim() == 4 else 1   # a bad B is reported by the C glue
        nblk = -(-length // block) if block > 0 else 1  # a bad block is reported by the C glue
        y = torch.empty(batch, length, heads, headdim, dtype=comp, device=x.device)
        hlast = torch.empty(batch, heads, headdim, dstate, dtype=comp, device=x.device)
        ckpt = torch.empty(batch, heads, headdim, nblk, dstate, dtype=comp, device=x.device)
        x, dt, A, B, C, D, z, h0 = (t.detach() if isinstance(t, torch.Tensor) else t for t in (x, dt, A, B, C, D, z, h0))
        _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, _work(x, dstate, block, comp), stream_for(x))
        ctx.save_for_backward(x, dt, A, B, C, D, z, ckpt)
        ctx.block = block
        ctx.has = (D is not None, z is not None, h0 is not None)
        ctx.mark_non_differentiable(ckpt)
        return y.to(x.dtype), hlast

    @staticmethod
    def backward(ctx, dy, dhlast):
        x, dt, A, B, C, D, z, ckpt = ctx.saved_tensors
        comp = _compute_dtype(x)
        batch, length, heads, headdim = x.shape
        dstate = B.shape[-1]
        dev = x.device
        dy = torch.zeros(x.shape, dtype=comp, device=dev) if dy is None else dy.to(comp).contiguous()
        dhlast = None if dhlast is None else dhlast.to(comp).contiguous()
        new = lambda *s: torch.empty(*s, dtype=comp, device=dev)  # noqa: E731
        dx = new(batch, length, heads, headdim)
        dz = new(batch, length, heads, headdim) if z is not None else None
        ddt = torch.zeros(batch, length, heads, dtype=comp, device=dev)
        dB = torch.zeros(B.shape, dtype=comp, device=dev)
        dC = torch.zeros(B.shape, dtype=comp, device=dev)
        dA, dD = new(batch, heads, headdim), new(batch, heads, headdim)
        dh0 = new(batch, heads, headdim, dstate)
        _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dhlast, dx, ddt, dz, dB, dC, dA, dD, dh0, ctx.block,
                        _work(x, dstate, ctx.block, comp), stream_for(x))
        has_D, has_z, has_h0 = ctx.has
        io = x.dtype
        return (dx.to(io), ddt.to(io), dA.sum((0, 2)), dB.to(io), dC.to(io), dD.sum((0, 2)) if has_D else None,
                dz.to(io) if has_z else None, dh0 if has_h0 else None, None)


def _prepare(name, t, comp, required=False):
    """A / D / h0: floating tensors, cast (differentiably) to the compute dtype, made contiguous."""
    if t is None:
        if required:
            raise TypeError(f"{_FN}: argument '{name}' must be a tensor, not None")
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_FN}: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{_FN}: argument '{name}' has dtype {t.dtype}; expected a floating dtype")
    return t.to(comp).contiguous()


def ssd_scan(x, dt, A, B, C, D=None, z=None, h0=None, return_final_state=False, *, block=DEFAULT_BLOCK):
    """y = SSD scan of x (see the module docstring); with return_final_state, (y, final state).

    x: (batch, len, heads, headdim); dt: (batch, len, heads), dt > 0 (softplus already applied);
    A: (heads,) (negative for a decaying state); B, C: (batch, len, groups, dstate); D: (heads,) or
    None; z: (batch, len, heads, headdim) or None (gate y * silu(z)); h0: (batch, heads, headdim,
    dstate) or None (zeros). x, dt, B, C, z share one dtype (float32, float16, bfloat16 or float64);
    A, D, h0 are cast to the compute dtype. Differentiable in every tensor argument, including h0
    and the final state. block: steps between stored states (memory vs recompute in backward).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_FN}: argument 'x' must be a torch.Tensor, not {type(x).__name__}")
    if x.dtype not in _IO_DTYPES:
        raise TypeError(f"{_FN}: argument 'x' has dtype {x.dtype}; expected float32, float16, bfloat16 or float64")
    if x.dim() != 4:
        raise ValueError(f"{_FN}: argument 'x' must have 4 dimensions (batch, len, heads, headdim); got {x.dim()}")
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{_FN}: 'block' must be an int, not {type(block).__name__}")
    comp = _compute_dtype(x)
    A = _prepare("A", A, comp, required=True)
    D = _prepare("D", D, comp)
    h0 = _prepare("h0", h0, comp)
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if B is None:
        raise TypeError(f"{_FN}: argument 'B' must be a tensor, not None")
    ct = lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t  # noqa: E731
    y, hlast = _SSDScanFn.apply(ct(x), ct(dt), A, ct(B), ct(C), D, ct(z), h0, block)
    return (y, hlast) if return_final_state else y
