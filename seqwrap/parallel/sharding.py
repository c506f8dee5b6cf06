"""Splitting a batch along the sequence for sequence-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import documents as docs_mod


def _rank_positions(s: int, p: int, r: int, chunk_size: int | None) -> torch.Tensor:
    """Global positions held by rank r of p: one contiguous slice of s / p tokens, or (chunk_size
    given) the r-th p-th of every chunk of chunk_size tokens (the last chunk may be shorter)."""
    if chunk_size is None:
        n = s // p
        return torch.arange(r * n, (r + 1) * n)
    parts = []
    for c0 in range(0, s, chunk_size):
        n = (min(s, c0 + chunk_size) - c0) // p
        parts.append(torch.arange(c0 + r * n, c0 + (r + 1) * n))
    return torch.cat(parts)


def shard_batch(batch: dict, group=None, *, chunk_size: int | None = None, ignore_index: int = -100) -> dict:
    """This rank's part of a (B, S) batch, ready for `model(**shard)` (or a SeCO/SpaCO engine).

    batch: input_ids (B, S); optional labels (B, S) (HF semantics: aligned with
    input_ids, shifted inside; default labels = input_ids); optional attention_mask,
    which must be all ones (pack sequences instead of padding). S must be a
    multiple of the group size.

    chunk_size=None: each rank holds one contiguous slice of S / P tokens (plain Ulysses).
    chunk_size=C (for seqwrap.SeCO / SpaCO(model, chunk_size=C) over a Ulysses-patched model;
    C a multiple of P): each rank holds the r-th P-th of every chunk of C tokens, so that the
    ranks together attend over one whole chunk at a time.

    Returns input_ids, position_ids (global positions, for RoPE), labels and
    shift_labels: the labels already shifted over the whole sequence, so the
    last token of one shard predicts the first of the next; and
    num_items_in_batch: the number of non-ignored labels of the whole batch, so
    each rank's loss is its share of the global mean and the ranks' losses
    (and gradients) add up to the single-process ones.

    Packed rows (several documents each): give position_ids restarting per document, or cu_seqlens,
    seq_idx, or DataCollatorWithFlattening's cu_seq_lens_q / cu_seq_lens_k in `batch`. The shard then
    holds each token's position inside its document, the target of every document's last token is
    ignored, and cu_seq_lens_q / cu_seq_lens_k (int32) describe the documents of the *whole* (B, S)
    batch: the Ulysses attention (and SeCO / SpaCO under Ulysses) read them after the all-to-all, when
    every rank holds the whole sequence.
    """
    group = group or dist.group.WORLD
    p, r = dist.get_world_size(group), dist.get_rank(group)
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"shard_batch: input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
    b, s = ids.shape
    if s % p:
        raise ValueError(f"shard_batch: sequence length {s} is not a multiple of the {p} ranks; pad or trim it")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0 or chunk_size % p):
        raise ValueError(f"shard_batch: chunk_size must be a positive multiple of the {p} ranks, got {chunk_size!r}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("shard_batch: padded batches are not supported under Ulysses; pack sequences instead")
    labels = batch.get("labels")
    labels = ids if labels is None else labels
    if labels.shape != ids.shape:
        raise ValueError(f"shard_batch: labels {tuple(labels.shape)} must match input_ids {tuple(ids.shape)}")
    shifted = torch.cat([labels[:, 1:], torch.full((b, 1), ignore_index, dtype=labels.dtype, device=labels.device)], 1)
    docs = docs_mod.resolve((b, s), position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                            seq_idx=batch.get("seq_idx"), cu_seq_lens_q=batch.get("cu_seq_lens_q"),
                            cu_seq_lens_k=batch.get("cu_seq_lens_k"), what="shard_batch")
    pos = _rank_positions(s, p, r, chunk_size).to(ids.device)
    positions = pos.expand(b, pos.numel())
    if docs is not None:
        docs = docs.to(ids.device)
        shifted = shifted.masked_fill(docs.ends(), ignore_index)
        positions = docs.positions()[:, pos]
    shift = shifted[:, pos].contiguous()
    out = {
        "input_ids": ids[:, pos].contiguous(),
        "position_ids": positions,
        "labels": shift,
        "shift_labels": shift,
        "num_items_in_batch": (shifted != ignore_index).sum(),
    }
    if docs is not None:
        cu = docs.cu_seqlens().to(ids.device)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    return out
