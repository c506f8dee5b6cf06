"""seqwrap::document_ids: the document boundary conventions (position_ids, cu_seqlens, seq_idx) turned into
(B, T) document ids inside a custom op, so a torch.compile(fullgraph=True) graph can take packed rows.

Resolving boundaries reads tensor values (cu_seqlens must start at 0, increase, cover every row, ...) and
decides on them: traced Python would break the graph at each of those reads. The op is opaque to the
compiler: its implementation runs documents.resolve, with every check and its message, when the graph
runs; its fake implementation only says that a (B, T) int64 tensor comes out. Eager calls of
chunked_attention do not use it (they resolve the boundaries directly, the same function).
"""
from __future__ import annotations

import torch

from . import documents as docs_mod


@torch.library.custom_op("seqwrap::document_ids", mutates_args=())
def document_ids_op(batch: int, length: int, device: torch.device, position_ids: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None, seq_idx: torch.Tensor | None, what: str) -> torch.Tensor:
    """(batch, length) int64 on `device`: the document of every token as documents.resolve finds it (zeros
    when every row is one document). Raises resolve's ValueError naming the argument."""
    _check(batch, length, position_ids, what)
    docs = docs_mod.resolve((batch, length), position_ids=position_ids, cu_seqlens=cu_seqlens, seq_idx=seq_idx,
                            what=what)
    if docs is None:
        return torch.zeros(batch, length, dtype=torch.int64, device=device)
    return docs.ids.to(device=device, dtype=torch.int64).clone()


@document_ids_op.register_fake
def _(batch, length, device, position_ids, cu_seqlens, seq_idx, what):
    _check(batch, length, position_ids, what)
    return torch.empty(batch, length, dtype=torch.int64, device=device)


def _check(batch, length, position_ids, what):
    if batch < 0 or length < 0:
        raise ValueError(f"{what}: the batch shape ({batch}, {length}) must not be negative")
    if position_ids is not None and tuple(position_ids.shape) != (batch, length):
        raise ValueError(f"{what}: position_ids must be (batch, T) = {(batch, length)}, got "
                         f"{tuple(position_ids.shape)}")


def document_ids(batch: int, length: int, device, *, position_ids=None, cu_seqlens=None, seq_idx=None,
                 what: str = "seqwrap") -> torch.Tensor:
    """The op, with cu_seqlens given as a tensor (a list or tuple becomes one)."""
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    return torch.ops.seqwrap.document_ids(batch, length, torch.device(device), position_ids, cu_seqlens, seq_idx,
                                          what)
