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

Packed sequences (several documents per row): pass the boundaries as `cu_seqlens`, `seq_idx` or
restarting `position_ids` (conventions: seqwrap/ops/documents.py). Attention is then block-diagonal
causal (the sliding window applies inside a document), and a block whose query and key chunks share
no document in any row is skipped: never computed, in forward or backward.
"""
from __future__ import annotations

import torch

from . import attention_args as args
from . import documents as docs_mod
from . import documents_op
from .attention_blocks import EMPTY, BlockBackward, attend
from .dtypes import real_dtype


def _blocks(t, chunk, causal, window, dtype, device, documents=None):
    """Yields (q0, q1, [(k0, k1, mask), ...]) over q chunks, skipping empty blocks (no allowed pair;
    with documents: no shared document)."""
    for q0 in range(0, t, chunk):
        q1 = min(t, q0 + chunk)
        kv = []
        for k0 in range(0, t, chunk):
            k1 = min(t, k0 + chunk)
            mask = docs_mod.block_mask(documents, q0, q1, k0, k1, causal=causal, window=window, dtype=dtype,
                                       device=device)
            if mask is not EMPTY:
                kv.append((k0, k1, mask))
        yield q0, q1, kv


# -- the op: seqwrap::chunked_attention and its backward ------------------------------------------------
# Both implementations check every argument (ops/attention_args.py: the wrapper's rules) before anything
# is allocated, the fake implementations every rule that does not read tensor values.
_OP = "torch.ops.seqwrap.chunked_attention"


def _check_static(fn, q, k, v, chunk, causal, window, scale, doc_ids):
    args.check(fn, q, k, v, chunk=chunk, causal=causal, window=window, scale=scale, chunk_name="chunk")
    args.check_doc_ids(fn, doc_ids, q)


def _checked(fn, q, k, v, chunk, causal, window, scale, doc_ids):
    """Every check, the value of doc_ids included; returns the Documents of doc_ids (or None)."""
    _check_static(fn, q, k, v, chunk, causal, window, scale, doc_ids)
    if doc_ids is None:
        return None
    documents = docs_mod.Documents(doc_ids)
    args.check_doc_order(fn, documents)
    return documents


@torch.library.custom_op("seqwrap::chunked_attention", mutates_args=())
def chunked_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, causal: bool,
                         window: int | None, scale: float, doc_ids: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, T, D), k, v (B, Hkv, T, D) -> (out (B, Hq, T, D), lse (B, Hq, T) real). doc_ids (B, T):
    the document of every token (packed rows: block-diagonal causal), or None."""
    documents = _checked(_OP, q, k, v, chunk, causal, window, scale, doc_ids)
    real = real_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=real, device=q.device)
    if q.numel() == 0:  # batch, query heads, T or head_dim is 0: no output element (as SDPA)
        return out, lse.fill_(float("-inf"))
    for q0, q1, kv in _blocks(q.shape[2], chunk, causal, window, q.dtype, q.device, documents):
        o, l = attend(q[:, :, q0:q1], ((k[:, :, k0:k1], v[:, :, k0:k1], m) for k0, k1, m in kv), scale)
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = l
    return out, lse


@chunked_attention_op.register_fake
def _(q, k, v, chunk, causal, window, scale, doc_ids):
    _check_static(_OP, q, k, v, chunk, causal, window, scale, doc_ids)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=real_dtype(q.dtype))


@torch.library.custom_op("seqwrap::chunked_attention_backward", mutates_args=())
def chunked_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, chunk: int, causal: bool, window: int | None,
                                  scale: float, doc_ids: torch.Tensor | None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) block by block from the final output and the global lse (no block's probabilities kept)."""
    documents = _checked(_OP + "_backward", q, k, v, chunk, causal, window, scale, doc_ids)
    args.check_backward(_OP + "_backward", dout, q, out, lse)
    if q.numel() == 0:  # k, v may hold elements (zero query heads): nothing attended to them
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.zeros_like(q, dtype=lse.dtype)
    dk = torch.zeros(k.shape, dtype=lse.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=lse.dtype, device=v.device)
    for q0, q1, kv in _blocks(q.shape[2], chunk, causal, window, q.dtype, q.device, documents):
        grads = BlockBackward(dout[:, :, q0:q1], q[:, :, q0:q1], out[:, :, q0:q1], lse[:, :, q0:q1], k.shape[1], scale)
        for k0, k1, mask in kv:
            gk, gv = grads.block(k[:, :, k0:k1], v[:, :, k0:k1], mask)
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
        dq[:, :, q0:q1] = grads.dq()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@chunked_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, chunk, causal, window, scale, doc_ids):
    _check_static(_OP + "_backward", q, k, v, chunk, causal, window, scale, doc_ids)
    args.check_backward(_OP + "_backward", dout, q, out, lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, chunk, causal, window, scale, doc_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.config = (chunk, causal, window, scale)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.seqwrap.chunked_attention_backward(dout.contiguous(), q, k, v, out, lse, *ctx.config,
                                                              doc_ids)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("seqwrap::chunked_attention", _backward, setup_context=_setup_context)


def chunked_attention(q, k, v, *, chunk_size: int, causal: bool = True, window: int | None = None,
                      scale: float | None = None, cu_seqlens=None, seq_idx=None, position_ids=None,
                      documents: docs_mod.Documents | None = None) -> torch.Tensor:
    """Exact attention computed block by block (see the module docstring). Returns (B, Hq, T, D).
    With no output element (B, Hq, T or D is 0) the result is empty, as with SDPA, and the
    gradients of k and v are zeros.

    Packed rows: cu_seqlens (D + 1,) over the flattened B * T tokens, seq_idx (B, T), position_ids
    (B, T) restarting per document ((1, T): the same positions for every row), or a ready
    seqwrap.ops.documents.Documents; no token attends to another document. The arguments are
    checked as the registered op checks them (ops/attention_args.py); under torch.compile the
    boundaries are resolved inside the seqwrap::document_ids op, so packed rows compile with
    fullgraph=True."""
    fn = "seqwrap.ops.chunked_attention"
    args.check(fn, q, k, v, chunk=chunk_size, causal=causal, window=window, scale=scale)
    if scale is None:  # head_dim 0: no output element, the scale is unused
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    scale = float(scale)
    shape = (q.shape[0], q.shape[2])
    position_ids = _rows_of_positions(fn, position_ids, shape)
    if documents is not None:
        if cu_seqlens is not None or seq_idx is not None or position_ids is not None:
            raise TypeError(f"{fn}: pass documents or raw boundaries (cu_seqlens, seq_idx, position_ids), not both")
        if not isinstance(documents, docs_mod.Documents):
            raise TypeError(f"{fn}: documents must be a seqwrap.ops.documents.Documents or None, not "
                            f"{type(documents).__name__} (pass raw boundaries as cu_seqlens, seq_idx or position_ids)")
        if (documents.batch, documents.length) != shape:
            raise ValueError(f"{fn}: documents describe {documents.batch} rows of {documents.length} tokens, q has "
                             f"{q.shape[0]} of {q.shape[2]}")
        doc_ids = documents.ids.to(q.device)
    elif not q.numel() or (cu_seqlens is None and seq_idx is None and position_ids is None):
        doc_ids = None
    elif torch.compiler.is_compiling():  # resolved inside an op: value checks without a graph break
        doc_ids = documents_op.document_ids(*shape, q.device, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                            seq_idx=seq_idx, what=fn)
    else:
        resolved = docs_mod.resolve(shape, position_ids=position_ids, cu_seqlens=cu_seqlens, seq_idx=seq_idx, what=fn)
        doc_ids = None if resolved is None else resolved.ids.to(q.device)
    return torch.ops.seqwrap.chunked_attention(q, k, v, chunk_size, causal, window, scale, doc_ids)[0]


def _rows_of_positions(fn: str, position_ids, shape):
    """position_ids as (B, T): a (B, T) integer tensor as it is, (1, T) expanded to every row; else ValueError."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{fn}: position_ids must be a torch.Tensor or None, not {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: position_ids must hold integer positions, not {position_ids.dtype}")
    if position_ids.dim() != 2 or position_ids.shape[1] != shape[1] or position_ids.shape[0] not in (1, shape[0]):
        raise ValueError(f"{fn}: position_ids must be (batch, T) = {shape} or (1, T), got {tuple(position_ids.shape)}")
    return position_ids.expand(shape)
