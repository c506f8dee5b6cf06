"""The chunked engines' attention: HF attention-function registry entry that reads the past K/V
of a ChunkKVCache block by block (FPDT-style), instead of concatenating it.

While an engine step runs (`chunked_attention_impl`), the model's attention implementation is
switched to IMPL. HF's attention modules then call `seco_attention(module, q, k, v, mask, ...)`
with q (B, Hq, L, D) and the chunk's own (fresh) k, v (B, Hkv, L, D) after RoPE (the cache's
update returned them unchanged). `seco_attention` asks the cache for the past chunks this layer
sees and merges block results with the LSE merge kernel:

  pass 1 (record, no grad): plain forward; the chunk's K/V are stored (on the host with offload);
  pass 2 (replay): `_AttendWithPast`, an autograd Function whose backward recomputes each block's
      gradient from the final output and lse, sends dK, dV of past chunks into their relay sinks
      and returns dq and the fresh dk, dv.

No (B, H, T, D) concatenation of the past is ever formed, and HF builds no (L, T) mask: masks
come per block from positions (causal, sliding window) and the key padding the engine passes.
Under Ulysses (the model was patched by seqwrap.parallel.apply_ulysses) q, k, v go through the
all-to-all first: every rank then attends over whole chunks for its share of the heads, and the
cache holds those head shards.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..ops.attention_blocks import EMPTY, BlockBackward, attend

IMPL = "seqwrap_chunked"
_ACTIVE: dict = {"cache": None}
_registered = False


class _AttendWithPast(torch.autograd.Function):
    """q (B,Hq,L,D) over [past chunks of `layer` held by `cache`; fresh k, v (B,Hkv,L,D)]."""

    @staticmethod
    def forward(ctx, q, k, v, cache, layer, scale, softcap):
        fresh_mask = cache.mask(layer, cache.chunk, q.dtype, q.device)
        out, lse = attend(q, _blocks(cache, layer, q, k, v, fresh_mask), scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cache, layer, scale, softcap, fresh_mask, set(cache.grad_chunks))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cache, layer, scale, softcap, fresh_mask, grad_chunks = ctx.args
        grads = BlockBackward(dout, q, out, lse, k.shape[1], scale, softcap)
        for j, kj, vj, mask in cache.past_blocks(layer, q.dtype, q.device):
            gk, gv = grads.block(kj, vj, mask)
            if j in grad_chunks:
                sink_k, sink_v = cache._sink(j, layer)
                sink_k.add_(gk)
                sink_v.add_(gv)
        if fresh_mask is EMPTY:  # every key of the chunk is padding
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        else:
            dk, dv = grads.block(k, v, fresh_mask)
        return grads.dq().to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _blocks(cache, layer, q, k, v, fresh_mask):
    for _, kj, vj, mask in cache.past_blocks(layer, q.dtype, q.device):
        yield kj, vj, mask
    if fresh_mask is not EMPTY:
        yield k, v, fresh_mask


def seco_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers attention-function signature. query (B, Hq, L, D), key/value (B, Hkv, L, D) of the
    current chunk. Returns (attn_output (B, L, Hq, D), None)."""
    cache = _ACTIVE["cache"]
    if cache is None:
        raise RuntimeError(f"the '{IMPL}' attention only runs inside a seqwrap SeCO/SpaCO step")
    if attention_mask is not None:
        raise ValueError(f"seqwrap: '{IMPL}' attention got a prepared attention mask; the chunked engines "
                         "build their masks themselves (pass the 2-D attention_mask to the engine)")
    if dropout and module.training:
        raise ValueError("seqwrap: attention dropout is not supported by the chunked engines; set the model's "
                         "attention_dropout to 0 or call model.eval()")
    if kwargs.get("s_aux") is not None:
        raise ValueError("seqwrap: attention sinks (s_aux) are not supported by the chunked engines")
    layer = module.layer_idx
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    ulysses = getattr(module, "_seqwrap_ulysses", None)
    if ulysses is not None:
        from ..parallel.ulysses import to_head_shards

        query, key, value = to_head_shards(query, key, value, ulysses[0])
    cache.record(layer, key, value)
    if cache.mode == "record":
        fresh_mask = cache.mask(layer, cache.chunk, query.dtype, query.device)
        out, _ = attend(query, _blocks(cache, layer, query, key, value, fresh_mask), scale, softcap)
    else:
        out = _AttendWithPast.apply(query, key, value, cache, layer, scale, softcap)
    if ulysses is not None:
        from ..parallel.ulysses import from_head_shards

        out = from_head_shards(out, ulysses[0])
    return out.transpose(1, 2).contiguous(), None


def _configs(model):
    """Every config object of the model (the top one and sub-configs of its modules), once."""
    found = {id(model.config): model.config}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            found.setdefault(id(cfg), cfg)
    return list(found.values())


@contextmanager
def chunked_attention_impl(model, cache):
    """Within the block, `model`'s attention runs through seco_attention over `cache`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPL, seco_attention)
        _registered = True
    if _ACTIVE["cache"] is not None:
        raise RuntimeError("seqwrap: a chunked engine step is already running in this process")
    configs = _configs(model)
    previous = [cfg._attn_implementation for cfg in configs]
    _ACTIVE["cache"] = cache
    try:
        for cfg in configs:
            cfg._attn_implementation = IMPL
        yield
    finally:
        for cfg, impl in zip(configs, previous):
            cfg._attn_implementation = impl
        _ACTIVE["cache"] = None
