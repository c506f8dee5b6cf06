"""Ulysses sequence parallelism: the all-to-all switches and the attention of one rank's shard.

The HF side (apply_ulysses / remove_ulysses, the attention-registry entry) lives in
seqwrap/hf/ulysses.py; seqwrap.parallel re-exports it.

    seqwrap.parallel.apply_ulysses(model, group)
    shard = seqwrap.parallel.shard_batch({"input_ids": ids, "labels": labels}, group)
    loss = model(**shard).loss          # this rank's share of the global mean loss
    loss.backward(); seqwrap.parallel.allreduce_gradients(model, group)

Every rank runs the whole model on its contiguous sequence shard. Around
attention, an all-to-all trades the sequence shard for a head shard: each rank
then attends over the whole sequence for H/P heads (causal, with the layer's
sliding window if it has one), and a second all-to-all trades back. K/V heads
fewer than the ranks (or not divisible by them) are replicated to the query
heads first. Attention inside a rank is F.scaled_dot_product_attention, or
seqwrap.ops.chunked_attention when `chunk_size` is given (and always for
sliding-window layers and packed rows: `documents`, the document layout of the
whole sequence, keeps every token to its own document).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.attention import chunked_attention
from .all_to_all import HeadsToSeq, SeqToHeads


def _repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, s, D) -> (B, Hkv * n, s, D), each head repeated n times in place (GQA order)."""
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def to_head_shards(query, key, value, group):
    """Sequence shards -> head shards: query (B, Hq, s, D), key/value (B, Hkv, s, D) of this rank's
    part of the sequence become (B, Hq/P, S, D) and (B, Hkv'/P, S, D) over the whole sequence, K/V
    heads replicated first when Hkv is not a multiple of P (differentiable)."""
    p = dist.get_world_size(group)
    hq, hkv = query.shape[1], key.shape[1]
    if hq % p:
        raise ValueError(f"seqwrap.parallel: {hq} query heads cannot be split over {p} ranks")
    if hkv % p:  # replicate K/V heads so they split like the query heads
        key, value = _repeat_heads(key, hq // hkv), _repeat_heads(value, hq // hkv)
    return SeqToHeads.apply(query, group), SeqToHeads.apply(key, group), SeqToHeads.apply(value, group)


def local_heads(per_head: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of a per-query-head tensor (Hq, ...) -> (Hq/P, ...): the heads to_head_shards gives
    it (rank r: heads [r*Hq/P, (r+1)*Hq/P)). Differentiable (a slice): its gradient is zero on the other
    ranks' heads, which those ranks supply, so the usual gradient all-reduce sums to the whole."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    n = per_head.shape[0] // p
    return per_head[r * n:(r + 1) * n]


def from_head_shards(out, group):
    """Head shards -> sequence shards: (B, Hq/P, S, D) -> (B, Hq, s, D) (differentiable)."""
    return HeadsToSeq.apply(out, group)


def ulysses_attend(query, key, value, group, *, chunk_size: int | None = None, window: int | None = None,
                   scale: float | None = None, documents=None):
    """Causal attention of this rank's sequence shard, computed over the whole sequence for H/P heads.

    query (B, Hq, s, D), key/value (B, Hkv, s, D) for the local shard; returns (B, Hq, s, D).
    Inside the rank: seqwrap.ops.chunked_attention when chunk_size, a sliding window or documents
    (a seqwrap.ops.documents.Documents over the whole (B, S) sequence) are given, else
    F.scaled_dot_product_attention."""
    q, k, v = to_head_shards(query, key, value, group)
    if window is not None or chunk_size is not None or documents is not None:
        out = chunked_attention(q, k, v, chunk_size=chunk_size or q.shape[2], window=window, scale=scale,
                                documents=documents)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return from_head_shards(out, group)
