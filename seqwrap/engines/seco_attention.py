"""The chunked engines' attention: reads the past K/V of a ChunkKVStore block by block (FPDT-style),
instead of concatenating it.

While an engine step runs, the model's attention goes through seqwrap's entry in transformers'
attention registry (seqwrap/hf/attention.py), which calls `attend_chunk(store, layer, q, k, v, ...)`
with q (B, Hq, L, D) and the chunk's own (fresh) k (B, Hkv, L, D), v (B, Hkv, L, Dv) after RoPE (the
cache's update returned them unchanged; Dv may differ from D) and, for models with attention sinks
(gpt-oss `s_aux`), the per-head sink logits (Hq,). `attend_chunk` asks the store for the past chunks this layer
sees and merges block results with the LSE merge kernel:

  pass 1 (record, no grad): plain forward; the chunk's K/V are stored (on the host with offload);
  pass 2 (replay): `_AttendWithPast`, an autograd Function whose backward recomputes each block's
      gradient from the final output and lse, sends dK, dV of past chunks into their relay sinks
      and returns dq, the fresh dk, dv and the attention sinks' gradient.

Attention sinks are folded into the merged result once per query chunk (attention_blocks.fold_sinks):
the final output and the lse with the sink included are what every block's backward needs, so the
past chunks' relayed dK, dV and the fresh dq, dk, dv stay exact.

No (B, H, T, D) concatenation of the past is ever formed, and HF builds no (L, T) mask: masks
come per block from positions (causal, sliding window) and the key padding the engine passes.
Under Ulysses (the model was patched by seqwrap.parallel.apply_ulysses; the store's group is set)
q, k, v go through the all-to-all first: every rank then attends over whole chunks for its share of
the heads, and the store holds those head shards; the sinks are sliced to the same heads.
"""
from __future__ import annotations

import torch

from ..ops.attention_blocks import EMPTY, BlockBackward, attend
from ..parallel.ulysses import from_head_shards, local_heads, to_head_shards


class _AttendWithPast(torch.autograd.Function):
    """q (B,Hq,L,D) over [past chunks of `layer` held by `cache`; fresh k (B,Hkv,L,D), v (B,Hkv,L,Dv)],
    with the (Hq,) attention sinks folded in when `sinks` is a tensor. Returns (B,Hq,L,Dv)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cache, layer, scale, softcap):
        fresh_mask = cache.mask(layer, cache.chunk, q.dtype, q.device)
        out, lse = attend(q, _blocks(cache, layer, q, k, v, fresh_mask), scale, softcap, sinks, v.shape[-1])
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (cache, layer, scale, softcap, fresh_mask, set(cache.grad_chunks))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        cache, layer, scale, softcap, fresh_mask, grad_chunks = ctx.args
        grads = BlockBackward(dout, q, out, lse, k.shape[1], scale, softcap, sinks)
        for j, kj, vj, mask in cache.past_blocks(layer, q.dtype, q.device):
            gk, gv = grads.block(kj, vj, mask)
            if j in grad_chunks:
                relay_k, relay_v = cache.sink(j, layer)  # the relayed dK, dV of past chunk j
                relay_k.add_(gk)
                relay_v.add_(gv)
        if fresh_mask is EMPTY:  # every key of the chunk is padding
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        else:
            dk, dv = grads.block(k, v, fresh_mask)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = grads.sinks_grad().to(sinks.dtype)
        return grads.dq().to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None


def _blocks(cache, layer, q, k, v, fresh_mask):
    for _, kj, vj, mask in cache.past_blocks(layer, q.dtype, q.device):
        yield kj, vj, mask
    if fresh_mask is not EMPTY:
        yield k, v, fresh_mask


@torch.compiler.disable  # reads and writes the engine's store: under a compiled model the graph breaks here
def attend_chunk(store, layer: int, query, key, value, scale: float, softcap=None, sinks=None):
    """Attention of the current chunk's queries over the past chunks `layer` sees plus the fresh key/value.

    store: the step's ChunkKVStore; query (B, Hq, L, D), key (B, Hkv, L, D), value (B, Hkv, L, Dv) of the
    current chunk after RoPE; sinks: (Hq,) per-head attention-sink logits (gpt-oss s_aux) or None.
    Under Ulysses (store.group set) q, k, v are this rank's sequence shard and go through the all-to-all
    first, and the sinks are sliced to this rank's heads. Returns (B, Hq, L, Dv)."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # as SDPA under autocast: q, k, v in the autocast dtype
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if sinks is not None and tuple(sinks.shape) != (query.shape[1],):
        raise ValueError(f"seqwrap: attention sinks must have shape ({query.shape[1]},) (one per query head), "
                         f"got {tuple(sinks.shape)}")
    group = store.group
    if group is not None:
        query, key, value = to_head_shards(query, key, value, group)
        if sinks is not None:  # (Hq,) -> (Hq/P,): this rank's heads, as to_head_shards split the queries
            sinks = local_heads(sinks, group)
    store.record(layer, key, value)
    if store.mode == "record":
        fresh_mask = store.mask(layer, store.chunk, query.dtype, query.device)
        out, _ = attend(query, _blocks(store, layer, query, key, value, fresh_mask), scale, softcap, sinks,
                        value.shape[-1])
    else:
        out = _AttendWithPast.apply(query, key, value, sinks, store, layer, scale, softcap)
    if group is not None:
        out = from_head_shards(out, group)
    return out
