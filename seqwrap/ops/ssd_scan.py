"""Mamba-2 (SSD) scan: the Mamba-2 front end of the one selective-scan op (csrc/scan/).

Per head h (scalar A[h]), head channel p and state n, with g the head's B/C group:

    s_t[p, n] = exp(dt_t[h] * A[h]) * s_{t-1}[p, n] + dt_t[h] * B_t[g, n] * x_t[h, p]     s_{-1} = h0 (or 0)
    y_t[h, p] = (sum_n C_t[g, n] * s_t[p, n] + D[h] * x_t[h, p]) * silu(z_t[h, p])

Shapes as in mamba-ssm's mamba_chunk_scan_combined: x, z: (batch, len, heads, headdim);
dt: (batch, len, heads); A, D: (heads,); B, C: (batch, len, groups, dstate) with heads % groups == 0;
h0 and the final state: (batch, heads, headdim, dstate).

`dt` is the positive step, softplus (and any clamp) already applied, as HF's Mamba2 mixers form
it before their chunk scan: pass `softplus(dt_raw + dt_bias)` yourself.

The result is the recurrence HF's `mamba2_chunk_scan` (the SSD "chunked" form) computes; the kernel
(the same one as seqwrap.ops.selective_scan's, with A scalar per head: one exp per step and head)
runs it as a sequential scan of each head's (headdim, dstate) state, storing it every `block` steps;
the backward recomputes inside each block and runs the adjoint backwards, giving gradients for x,
dt, A, B, C, D, z and h0 and accepting a gradient on the final state. Packed documents: `seq_idx` /
`reset` (batch, len) as in seqwrap.ops.selective_scan. Memory is O(len * heads * headdim) for y plus
the block checkpoints, never (len x chunk) matrices.

Precision: float64 inputs compute in float64, everything else (float32, float16, bfloat16 inputs)
in float32. y comes back in x's dtype, the final state in the compute dtype.
"""
from __future__ import annotations

import torch

from .._ext import C as _C
from ._stream import stream_for
from .library import _d
from .selective_scan import _IO_DTYPES, _prepare, resets

DEFAULT_BLOCK = 64
_FN = "seqwrap.ssd_scan"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x, B, fn=_FN):
    """(batch, len, heads, headdim, dstate) from x and B, or a TypeError / ValueError naming the argument
    (the registered ops size their outputs from these two before the C glue checks the rest)."""
    for name, t in (("x", x), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: argument 'x' must have 4 dimensions (batch, len, heads, headdim); got {x.dim()}")
    if B.dim() != 4:
        raise ValueError(f"{fn}: argument 'B' must have shape (batch, len, groups, dstate) with batch = "
                         f"{x.shape[0]} and len = {x.shape[1]} (from x); got {tuple(B.shape)}")
    return (*x.shape, B.shape[-1])


def _work(x: torch.Tensor, dstate: int, block: int, comp: torch.dtype):
    """CUDA scratch: rows * (block + 7) * dstate values (csrc/scan/scan.h); None on CPU."""
    if not x.is_cuda:
        return None
    batch, _, heads, headdim = x.shape
    return torch.empty(batch * heads * headdim * (block + 7) * dstate, dtype=comp, device=x.device)


def _shapes(x, B, block):
    batch, length, heads, headdim, dstate = _dims(x, B)
    nblk = -(-length // block) if block > 0 else 1  # a bad block is reported by the C glue
    return (batch, length, heads, headdim), (batch, heads, headdim, dstate), (batch, heads, headdim, nblk, dstate)


@torch.library.custom_op("seqwrap::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None, z: torch.Tensor | None, h0: torch.Tensor | None,
                    block: int, reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (batch, len, heads, headdim), h_last (batch, heads, headdim, dstate), block checkpoints), in
    the compute dtype. reset: None or int32 (batch, len) document starts. Autograd formula below."""
    comp = _compute_dtype(x)
    ys, hs, cs = _shapes(x, B, block)
    y, hlast, ckpt = (torch.empty(sh, dtype=comp, device=x.device) for sh in (ys, hs, cs))
    x, dt, A, B, C, D, z, h0 = (_d(t) for t in (x, dt, A, B, C, D, z, h0))
    _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, _work(x, hs[-1], block, comp), stream_for(x),
                    reset=reset)
    return y, hlast, ckpt


@ssd_scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, h0, block, reset=None):
    comp = _compute_dtype(x)
    return tuple(x.new_empty(sh, dtype=comp) for sh in _shapes(x, B, block))


def _grad_shapes(x, B, z):
    """Shapes of (dx, ddt, dA, dB, dC, dD, dz, dh0)."""
    batch, length, heads, headdim, dstate = _dims(x, B, _FN + " (backward)")
    xs, rows = (batch, length, heads, headdim), (batch, heads, headdim)
    return (xs, (batch, length, heads), rows, tuple(B.shape), tuple(B.shape), rows, xs if z is not None else (0,),
            (*rows, dstate))


@torch.library.custom_op("seqwrap::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: torch.Tensor | None, z: torch.Tensor | None, ckpt: torch.Tensor, dy: torch.Tensor,
                    dhlast: torch.Tensor | None, block: int, reset: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA (batch, heads, headdim), dB, dC, dD (batch, heads, headdim), dz ((0,) without z), dh0),
    compute dtype."""
    comp = _compute_dtype(x)
    out = [torch.empty(s, dtype=comp, device=x.device) for s in _grad_shapes(x, B, z)]
    x, dt, A, B, C, D, z, ckpt, dy, dhlast = (_d(t) for t in (x, dt, A, B, C, D, z, ckpt, dy, dhlast))
    dx, ddt, dA, dB, dC, dD, dz, dh0 = out
    _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dhlast, dx, ddt, dz if z is not None else None, dB, dC, dA, dD,
                    dh0, block, _work(x, B.shape[-1], block, comp), stream_for(x), reset=reset)
    return tuple(out)


@ssd_scan_bwd_op.register_fake
def _(x, dt, A, B, C, D, z, ckpt, dy, dhlast, block, reset=None):
    comp = _compute_dtype(x)
    return tuple(x.new_empty(s, dtype=comp) for s in _grad_shapes(x, B, z))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, h0, block, reset = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, output[2], reset)
    ctx.block = block
    ctx.has = (D is not None, z is not None, h0 is not None)


def _backward(ctx, dy, dhlast, _dckpt):
    x, dt, A, B, C, D, z, ckpt, reset = ctx.saved_tensors
    comp = _compute_dtype(x)
    dy = torch.zeros(x.shape, dtype=comp, device=x.device) if dy is None else dy.to(comp).contiguous()
    dhlast = None if dhlast is None else dhlast.to(comp).contiguous()
    dx, ddt, dA, dB, dC, dD, dz, dh0 = torch.ops.seqwrap.ssd_scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dhlast,
                                                                      ctx.block, reset)
    has_D, has_z, has_h0 = ctx.has
    io = x.dtype
    return (dx.to(io), ddt.to(io), dA.sum((0, 2)), dB.to(io), dC.to(io), dD.sum((0, 2)) if has_D else None,
            dz.to(io) if has_z else None, dh0 if has_h0 else None, None, None)


torch.library.register_autograd("seqwrap::ssd_scan_fwd", _backward, setup_context=_setup_context)


def ssd_scan(x, dt, A, B, C, D=None, z=None, h0=None, return_final_state=False, *, block=DEFAULT_BLOCK,
             seq_idx=None, reset=None):
    """y = SSD scan of x (see the module docstring); with return_final_state, (y, final state).

    x: (batch, len, heads, headdim); dt: (batch, len, heads), dt > 0 (softplus already applied);
    A: (heads,) (negative for a decaying state); B, C: (batch, len, groups, dstate); D: (heads,) or
    None; z: (batch, len, heads, headdim) or None (gate y * silu(z)); h0: (batch, heads, headdim,
    dstate) or None (zeros). x, dt, B, C, z share one dtype (float32, float16, bfloat16 or float64);
    A, D, h0 are cast to the compute dtype. Differentiable in every tensor argument, including h0
    and the final state. block: steps between stored states (memory vs recompute in backward).
    seq_idx / reset (batch, len): document boundaries of packed rows (as seqwrap.ops.selective_scan).
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
    A = _prepare("A", A, comp, required=True, fn=_FN)
    D = _prepare("D", D, comp, fn=_FN)
    h0 = _prepare("h0", h0, comp, fn=_FN)
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{_FN}: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if B is None:
        raise TypeError(f"{_FN}: argument 'B' must be a tensor, not None")
    _dims(x, B)
    rs = resets(x, seq_idx, reset, shape=(x.shape[0], x.shape[1]), fn=_FN)
    ct = lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t  # noqa: E731
    y, hlast, _ = torch.ops.seqwrap.ssd_scan_fwd(ct(x), ct(dt), A, ct(B), ct(C), D, ct(z), h0, block, rs)
    y = y.to(x.dtype)
    return (y, hlast) if return_final_state else y
