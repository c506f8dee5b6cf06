"""The C/CUDA entry points as torch custom ops (namespace `seqwrap`), so torch.compile keeps them in
its graph instead of breaking it at every call.

One op per C entry point, with a schema (from the type hints), one implementation for CPU and CUDA
(the C glue dispatches on the device itself), a fake implementation that only describes outputs,
and the mutated arguments declared. The higher-level ops with an autograd formula
(linear_cross_entropy, chunked_attention, the selective scan) are registered beside their Python
code and call these. The C core stays C: these are Python registrations over seqwrap._C.

  seqwrap::kahan_accumulate_    accs[i] += scale * grads[i], Kahan-compensated   (mutates accs, comps)
  seqwrap::lse_merge_           merge a block (out, lse) into an accumulator     (mutates acc, acc_lse)
  seqwrap::cross_entropy_chunk_ per-row loss + lse of a logits chunk; the logits are overwritten with
                                their gradient when compute_grad                  (mutates logits, loss_rows,
                                                                                   lse, flag)
  seqwrap::selective_scan_fwd   y, final state and block checkpoints of the scan (functional)
  seqwrap::selective_scan_bwd   gradients of every scan input                    (functional)

The chunk sampler (seqwrap.sample_chunks) is not registered: it runs in the engines' Python step
logic, never inside a model forward that torch.compile traces, and its 64-bit seed does not fit an
int64 schema argument.
"""
from __future__ import annotations

import torch

from .._ext import C
from ._stream import stream_for
from .dtypes import real_dtype

NS = "seqwrap"


def _d(t):
    """The bridge refuses tensors that require grad; below the autograd layer of an op with an autograd
    formula the inputs still carry the flag, so its kernels get detached aliases (same memory). The
    mutating ops have no autograd formula and pass their arguments as given (the bridge's checks stay)."""
    return t.detach() if isinstance(t, torch.Tensor) else t


def call(op, direct, *args):
    """`op(*args)` while torch.compile traces (the op stays in the graph); eagerly `direct(*args)`, the C
    entry point the op's implementation calls too: no dispatcher cost per call, and the C glue sees
    the caller's own tensors, so a meta, sparse or lazily-conjugated argument gets its named error
    instead of the dispatcher's handling of it."""
    if torch.compiler.is_compiling():
        return op(*args)
    return direct(*args)


# -- Kahan accumulation ---------------------------------------------------------------------------
def _kahan_direct(accs, comps, grads, scale):
    C.kahan_accumulate(accs, comps, grads, scale, stream_for(accs[0] if isinstance(accs, (list, tuple)) and accs
                                                             else None))


@torch.library.custom_op(f"{NS}::kahan_accumulate_", mutates_args=("accs", "comps"))
def kahan_accumulate_op(accs: list[torch.Tensor], comps: list[torch.Tensor], grads: list[torch.Tensor],
                        scale: float) -> None:
    _kahan_direct(list(accs), list(comps), list(grads), scale)


@kahan_accumulate_op.register_fake
def _(accs, comps, grads, scale):
    return None


def kahan_accumulate(accs, comps, grads, scale: float) -> None:
    call(torch.ops.seqwrap.kahan_accumulate_, _kahan_direct, accs, comps, grads, scale)


# -- LSE merge --------------------------------------------------------------------------------------
def _lse_merge_direct(acc, acc_lse, block_out, block_lse):
    C.lse_merge(acc, acc_lse, block_out, block_lse, stream_for(acc))


@torch.library.custom_op(f"{NS}::lse_merge_", mutates_args=("acc", "acc_lse"))
def lse_merge_op(acc: torch.Tensor, acc_lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """acc (..., L, D) real, acc_lse (..., L) real: merged with block_out (..., L, D), block_lse (..., L)."""
    _lse_merge_direct(acc, acc_lse, block_out, block_lse)


@lse_merge_op.register_fake
def _(acc, acc_lse, block_out, block_lse):
    return None


def lse_merge(acc, acc_lse, block_out, block_lse) -> None:
    call(torch.ops.seqwrap.lse_merge_, _lse_merge_direct, acc, acc_lse, block_out, block_lse)


# -- cross-entropy of one logits chunk ----------------------------------------------------------------
def cross_entropy_chunk(logits, labels, loss_rows, lse, row_scale, ignore_index, label_smoothing, z_loss, softcap,
                        compute_grad, flag, start):
    """logits (rows, V), labels (rows,) int64, loss_rows / lse (rows,) real, row_scale (rows,) or None,
    flag: CUDA int32 (1,) set when a label is out of range (None on CPU: the C glue raises).
    Called inside linear_cross_entropy's own op, so always directly."""
    C.cross_entropy_chunk(logits, labels, loss_rows, lse, row_scale, ignore_index, label_smoothing, z_loss, softcap,
                          compute_grad, flag, stream_for(logits), start)


@torch.library.custom_op(f"{NS}::cross_entropy_chunk_", mutates_args=("logits", "loss_rows", "lse", "flag"))
def cross_entropy_chunk_op(logits: torch.Tensor, labels: torch.Tensor, loss_rows: torch.Tensor, lse: torch.Tensor,
                           row_scale: torch.Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float, compute_grad: bool, flag: torch.Tensor | None, start: int) -> None:
    cross_entropy_chunk(logits, labels, loss_rows, lse, row_scale, ignore_index, label_smoothing, z_loss, softcap,
                        compute_grad, flag, start)


@cross_entropy_chunk_op.register_fake
def _(logits, labels, loss_rows, lse, row_scale, ignore_index, label_smoothing, z_loss, softcap, compute_grad, flag,
      start):
    return None


# -- selective scan -----------------------------------------------------------------------------------
def _scan_work(u: torch.Tensor, dstate: int, block: int, comp: torch.dtype):
    """CUDA scratch of the scan kernels (rows * (block + 7) * dstate, csrc/scan/scan.h); None on CPU."""
    if not u.is_cuda:
        return None
    return torch.empty(u.shape[0] * u.shape[1] * (block + 7) * dstate, dtype=comp, device=u.device)


def _scan_out_shapes(u, A, block):
    batch, dim, length = u.shape
    nblk = -(-length // block) if block > 0 else 1  # a bad block is reported by the C glue
    return (batch, dim, length), (batch, dim, A.shape[1]), (batch, dim, nblk, A.shape[1])


@torch.library.custom_op(f"{NS}::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C_: torch.Tensor,
                          D: torch.Tensor | None, z: torch.Tensor | None, h0: torch.Tensor | None,
                          block: int, truncation: int, grad_len: int, reset: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (batch, dim, len), h_last (batch, dim, dstate), checkpoints (batch, dim, blocks, dstate)), all in
    the compute dtype (float64 for float64 inputs, else float32). truncation and grad_len only shape the
    backward (see csrc/scan/scan.h; grad_len -1: the whole length); its autograd formula is registered in
    seqwrap/ops/selective_scan.py. reset (batch, len) int32 or None: document starts (packed rows)."""
    comp = real_dtype(u.dtype)
    ys, hs, cs = _scan_out_shapes(u, A, block)
    y = torch.empty(ys, dtype=comp, device=u.device)
    hlast = torch.empty(hs, dtype=comp, device=u.device)
    ckpt = torch.empty(cs, dtype=comp, device=u.device)
    u, dt, A, B, C_, D, z, h0 = (_d(t) for t in (u, dt, A, B, C_, D, z, h0))
    C.selective_scan_fwd(u, dt, A, B, C_, D, z, h0, y, hlast, ckpt, block, _scan_work(u, A.shape[1], block, comp),
                         stream_for(u), reset=reset)
    return y, hlast, ckpt


@selective_scan_fwd_op.register_fake
def _(u, dt, A, B, C_, D, z, h0, block, truncation, grad_len, reset):
    comp = real_dtype(u.dtype)
    ys, hs, cs = _scan_out_shapes(u, A, block)
    return u.new_empty(ys, dtype=comp), u.new_empty(hs, dtype=comp), u.new_empty(cs, dtype=comp)


@torch.library.custom_op(f"{NS}::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C_: torch.Tensor,
                          D: torch.Tensor | None, z: torch.Tensor | None, ckpt: torch.Tensor, dy: torch.Tensor,
                          dhlast: torch.Tensor | None, block: int, truncation: int, grad_len: int,
                          reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, ddt, dA (batch, dim, dstate) per batch row, dB, dC, dD (batch, dim), dz (empty without z),
    dh0), in the compute dtype. dy (batch, dim, len) and dhlast (batch, dim, dstate) or None, compute dtype."""
    u, dt, A, B, C_, D, z, ckpt, dy, dhlast = (_d(t) for t in (u, dt, A, B, C_, D, z, ckpt, dy, dhlast))
    comp = real_dtype(u.dtype)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    new = lambda *s: torch.empty(*s, dtype=comp, device=u.device)  # noqa: E731
    du, ddt = new(batch, dim, length), new(batch, dim, length)
    dz = new(batch, dim, length) if z is not None else new(0)
    dB = torch.zeros(batch, dstate, length, dtype=comp, device=u.device)
    dC = torch.zeros_like(dB)
    dA, dD, dh0 = new(batch, dim, dstate), new(batch, dim), new(batch, dim, dstate)
    C.selective_scan_bwd(u, dt, A, B, C_, D, z, ckpt, dy, dhlast, du, ddt, dz if z is not None else None, dB, dC, dA,
                         dD, dh0, block, truncation, grad_len, _scan_work(u, dstate, block, comp), stream_for(u),
                         reset=reset)
    return du, ddt, dA, dB, dC, dD, dz, dh0


@selective_scan_bwd_op.register_fake
def _(u, dt, A, B, C_, D, z, ckpt, dy, dhlast, block, truncation, grad_len, reset):
    comp = real_dtype(u.dtype)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    e = lambda *s: u.new_empty(s, dtype=comp)  # noqa: E731
    return (e(batch, dim, length), e(batch, dim, length), e(batch, dim, dstate), e(batch, dstate, length),
            e(batch, dstate, length), e(batch, dim), e(batch, dim, length) if z is not None else e(0),
            e(batch, dim, dstate))
