"""Selective scan (the Mamba-1 SSM recurrence) as an autograd op on the C/CUDA core.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        h_{-1} = h0 (or 0)
    y_t = (C_t . h_t + D * u_t) * silu(z_t)

Shapes as in mamba-ssm: u, dt, z: (batch, dim, len); A: (dim, dstate); B, C: (batch, dstate, len);
D: (dim,); h0 and the final state: (batch, dim, dstate).

`dt` is the positive step, softplus already applied: this matches HF `MambaMixer`'s slow path, where
`discrete_time_step = softplus(dt_proj(x) + bias)` is formed before the recurrence. Pass
`softplus(dt_raw + dt_bias)` yourself.

Precision: the state arithmetic runs in float64 for float64 inputs and in float32 otherwise
(float32, float16, bfloat16 inputs). y comes back in u's dtype, the final state in the compute dtype.
The forward stores the state only every `block` steps; the backward recomputes inside each block and
runs the adjoint backwards, giving gradients for u, dt, A, B, C, D, z, h0 and accepting a gradient on
the final state.

Packed sequences (several documents along `len`), as mamba-ssm's varlen path: `seq_idx` (batch, len)
gives each step's document; the state is reset to zero where it changes (h0 belongs to the first
document of each row). Or `reset` (batch, len), true where a document starts, also at step 0 (then
h0 is dropped for that row: a chunk that begins a new document). The kernels (C and CUDA) take the
reset; no state or adjoint crosses it.
"""
from __future__ import annotations

import torch

from . import library  # noqa: F401  (registers the seqwrap:: ops)
from .dtypes import real_dtype

DEFAULT_BLOCK = 64
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _setup_context(ctx, inputs, output):
    u, dt, A, B, C, D, z, h0, block, trunc, grad_len, reset = inputs
    ckpt = output[2]
    ctx.save_for_backward(u, dt, A, B, C, D, z, ckpt, reset)
    ctx.block, ctx.trunc = block, trunc
    ctx.grad_len = u.shape[2] if grad_len < 0 else grad_len
    ctx.has = (D is not None, z is not None, h0 is not None)


def _backward(ctx, dy, dhlast, _dckpt):
    """Gradients of (u, dt, A, B, C, D, z, h0) through seqwrap::selective_scan_bwd; dy (batch, dim, len)
    and dhlast (batch, dim, dstate) may be None (that output was not used)."""
    u, dt, A, B, C, D, z, ckpt, reset = ctx.saved_tensors
    comp = real_dtype(u.dtype)
    dy = torch.zeros(u.shape, dtype=comp, device=u.device) if dy is None else dy.to(comp).contiguous()
    dhlast = None if dhlast is None else dhlast.to(comp).contiguous()
    du, ddt, dA, dB, dC, dD, dz, dh0 = torch.ops.seqwrap.selective_scan_bwd(
        u, dt, A, B, C, D, z, ckpt, dy, dhlast, ctx.block, ctx.trunc, ctx.grad_len, reset)
    has_D, has_z, has_h0 = ctx.has
    io = u.dtype
    return (du.to(io), ddt.to(io), dA.sum(0), dB.to(io), dC.to(io),
            dD.sum(0) if has_D else None, dz.to(io) if has_z else None, dh0 if has_h0 else None,
            None, None, None, None)


torch.library.register_autograd("seqwrap::selective_scan_fwd", _backward, setup_context=_setup_context)


def _prepare(name, t, comp, required=False, fn="seqwrap.selective_scan"):
    """A / D / h0: floating tensors, cast (differentiably) to the compute dtype, made contiguous."""
    if t is None:
        if required:
            raise TypeError(f"{fn}: argument '{name}' must be a tensor, not None")
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: argument '{name}' has dtype {t.dtype}; expected a floating dtype")
    return t.to(comp).contiguous()


def resets(u: torch.Tensor, seq_idx=None, reset=None, shape=None, fn="seqwrap.selective_scan"):
    """The kernels' int32 (batch, len) reset tensor from seq_idx or reset (see the module docstring), or None.
    shape: the (batch, len) expected (default: from a Mamba-1 u (batch, dim, len))."""
    if seq_idx is not None and reset is not None:
        raise TypeError(f"{fn}: pass seq_idx or reset, not both")
    given, name = (seq_idx, "seq_idx") if seq_idx is not None else (reset, "reset")
    if given is None:
        return None
    if shape is None:
        shape = (u.shape[0], u.shape[2]) if isinstance(u, torch.Tensor) and u.dim() == 3 else None
    if not isinstance(given, torch.Tensor) or given.is_floating_point() or given.is_complex() or (
            shape is not None and tuple(given.shape) != shape):
        got = f"{given.dtype} of shape {tuple(given.shape)}" if isinstance(given, torch.Tensor) else type(given).__name__
        raise ValueError(f"{fn}: '{name}' must be an integer or bool tensor of shape (batch, len) = "
                         f"{shape}, got {got}")
    if seq_idx is not None:
        out = torch.zeros(given.shape, dtype=torch.int32, device=given.device)
        out[:, 1:] = (given[:, 1:] != given[:, :-1]).to(torch.int32)
        return out
    return (given != 0).to(torch.int32).contiguous()


def _scan(u, dt, A, B, C, D=None, z=None, h0=None, *, block=DEFAULT_BLOCK, truncation=0, grad_len=None,
          reset=None):
    """Shared by the public op and the adjoint-sharding engine (truncation / grad_len: see csrc/scan/scan.h).
    reset: None or the kernels' int32 (batch, len) tensor (resets())."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"seqwrap.selective_scan: argument 'u' must be a torch.Tensor, not {type(u).__name__}")
    if u.dtype not in _IO_DTYPES:
        raise TypeError(f"seqwrap.selective_scan: argument 'u' has dtype {u.dtype}; expected float32, float16, "
                        "bfloat16 or float64")
    # the output sizes come from u and A: check those two here, the C glue checks the rest
    if u.dim() != 3:
        raise ValueError(f"seqwrap.selective_scan: argument 'u' must have 3 dimensions (batch, dim, len); got {u.dim()}")
    comp = real_dtype(u.dtype)
    A = _prepare("A", A, comp, required=True)
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"seqwrap.selective_scan: argument 'A' must have shape (dim, dstate) with dim = "
                         f"{u.shape[1]} (u.shape[1]); got {tuple(A.shape)}")
    D = _prepare("D", D, comp)
    h0 = _prepare("h0", h0, comp)
    ct = lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t  # noqa: E731
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z), ("reset", reset)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"seqwrap.selective_scan: argument '{name}' must be a torch.Tensor, not {type(t).__name__}")
    y, hlast, _ = torch.ops.seqwrap.selective_scan_fwd(ct(u), ct(dt), A, ct(B), ct(C), D, ct(z), h0, int(block),
                                                      int(truncation), -1 if grad_len is None else int(grad_len),
                                                      ct(reset))
    return y.to(u.dtype), hlast


def selective_scan(u, dt, A, B, C, D=None, z=None, h0=None, return_final_state=False, *, seq_idx=None,
                   reset=None):
    """y = selective scan of u (see the module docstring); with return_final_state, (y, h_last).

    u, dt: (batch, dim, len), dt > 0 (softplus already applied); A: (dim, dstate) (negative for a
    decaying state); B, C: (batch, dstate, len); D: (dim,) or None; z: (batch, dim, len) or None (gate
    y * silu(z)); h0: (batch, dim, dstate) or None (zeros). u, dt, B, C, z share one dtype (float32,
    float16, bfloat16 or float64); A, D, h0 are cast to the compute dtype (float64 for float64 inputs,
    float32 otherwise). Differentiable in every tensor argument, including h0 and the final state.
    seq_idx / reset (batch, len): document boundaries of packed rows (module docstring).
    """
    y, hlast = _scan(u, dt, A, B, C, D, z, h0, reset=resets(u, seq_idx, reset))
    return (y, hlast) if return_final_state else y
