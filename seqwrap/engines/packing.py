"""Packed batches in the chunked engines (SeCO, SpaCO): the step's document layout and what follows.

    docs, position_ids, shift = prepare(name, ids, shift, mask, position_ids, boundaries, ...)

`boundaries` holds what the caller passed besides position_ids: cu_seqlens, seq_idx, and the keys of
transformers' DataCollatorWithFlattening (cu_seq_lens_q, cu_seq_lens_k; max_length_q / max_length_k
are derived values and are not needed). The layout (seqwrap.ops.documents.Documents) is in
*attention positions*: the local sequence, or under Ulysses the whole sequence (every rank attends
over whole chunks), where only explicit boundaries over the whole sequence are accepted (what
seqwrap.parallel.shard_batch emits) because a rank's own positions are not contiguous.

What a packed step changes:
  - attention: block-diagonal causal through the K/V store (past chunks that hold no key of the
    current chunk's documents are not read, and chunks no later chunk reads are not stored);
  - positions: without position_ids, each document's positions start at 0 (as if trained alone);
  - labels: the target of a document's last token (the next document's first token) is ignored, so
    the mean runs over the labels of the documents themselves (HF / DataCollatorWithFlattening rule).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import documents as docs_mod
from ..parallel.sharding import _rank_positions

BOUNDARY_KEYS = ("cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def prepare(name: str, ids: torch.Tensor, shift: torch.Tensor, mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, boundaries: dict, *, group=None, chunk_size: int = 0,
            ignore_index: int = -100, attention: str = "chunked"):
    """(documents or None, position_ids, shifted labels) of one engine step.

    ids, shift, mask, position_ids: (B, T) local tensors as the engine checked them (shift: labels
    already shifted); boundaries: the BOUNDARY_KEYS the caller passed (None when absent)."""
    what = f"seqwrap.{name}"
    unknown = sorted(set(boundaries) - set(BOUNDARY_KEYS))
    if unknown:
        raise TypeError(f"{what}: unknown boundary argument(s) {unknown}")
    explicit = {k: v for k, v in boundaries.items() if v is not None and k not in ("max_length_q", "max_length_k")}
    B, T = ids.shape
    if group is None:
        docs = docs_mod.resolve((B, T), position_ids=position_ids, attention_mask=mask, what=what, **explicit)
        ends = None if docs is None else docs.ends()
    else:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        docs = docs_mod.resolve((B, T * world), infer=False, what=f"{what} (boundaries over the whole sequence "
                                f"under Ulysses)", **explicit)
        if docs is not None:  # this rank's tokens in the whole sequence
            where = _rank_positions(T * world, world, rank, chunk_size).to(ids.device)
            ends = docs.to(ids.device).ends()[:, where]
        elif position_ids is not None and T > 1 and bool((position_ids[:, 1:] <= position_ids[:, :-1]).any()):
            raise ValueError(f"{what}: this rank's position_ids restart (packed documents) but no boundaries of the "
                             "whole sequence came with them; build the shard with seqwrap.parallel.shard_batch, "
                             "which adds cu_seq_lens_q / cu_seq_lens_k")
    if docs is None:
        return None, position_ids, shift
    if attention != "chunked":
        raise ValueError(f"{what}: packed batches (several documents per row) need attention='chunked'; the "
                         "'concat' path hands HF's own attention the past, which would attend across documents")
    docs = docs.to(ids.device)
    if position_ids is None:
        position_ids = docs.positions()
    shift = shift.masked_fill(ends.to(shift.device), ignore_index)
    return docs, position_ids, shift


def scan_segment(docs: docs_mod.Documents, start: int, end: int, kernel: int):
    """What the Mamba adapter needs for tokens [start, end) of a packed batch (seqwrap/hf/mamba.py):
    (reset (B, L) int32: 1 where a document starts, also at `start` when the previous token belongs to
    another document; taps (B, kernel, L) bool: conv input j of output t, at position start + t + j -
    (kernel - 1), lies in t's document)."""
    ids = docs.ids
    cur = ids[:, start:end]                                              # (B, L)
    prev = ids[:, start - 1:end - 1] if start > 0 else torch.cat([cur[:, :1], cur[:, :-1]], 1)
    reset = (cur != prev).to(torch.int32)
    ext = torch.cat([torch.full((ids.shape[0], kernel - 1), -1, dtype=ids.dtype, device=ids.device), ids], 1)
    taps = torch.stack([ext[:, start + j:end + j] == cur for j in range(kernel)], 1)
    return reset, taps
