"""Ulysses sequence parallelism for HF decoder LMs, through transformers' attention registry.

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
sliding-window layers).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.attention import chunked_attention
from .all_to_all import HeadsToSeq, SeqToHeads

IMPL = "seqwrap_ulysses"
_registered = False


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


def from_head_shards(out, group):
    """Head shards -> sequence shards: (B, Hq/P, S, D) -> (B, Hq, s, D) (differentiable)."""
    return HeadsToSeq.apply(out, group)


def ulysses_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      **kwargs):
    """transformers attention-function signature; query (B, Hq, s, D), key/value (B, Hkv, s, D) for the local shard.
    Returns (attn_output (B, s, Hq, D), None)."""
    state = getattr(module, "_seqwrap_ulysses", None)
    if state is None:
        raise RuntimeError("seqwrap ulysses attention called on a module that apply_ulysses did not patch")
    group, chunk_size = state
    if dropout and module.training:
        raise ValueError("seqwrap.parallel: attention dropout is not supported under Ulysses")
    if attention_mask is not None:
        raise ValueError("seqwrap.parallel: padding masks are not supported under Ulysses; pack sequences instead")
    q, k, v = to_head_shards(query, key, value, group)
    if sliding_window is not None or chunk_size is not None:
        out = chunked_attention(q, k, v, chunk_size=chunk_size or q.shape[2], window=sliding_window, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    out = from_head_shards(out, group)                        # (B, Hq, s, D)
    return out.transpose(1, 2).contiguous(), None


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPL, ulysses_attention)
        _registered = True


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and any(
        hasattr(m, name) for name in ("q_proj", "qkv_proj", "query_key_value"))]


def apply_ulysses(model, group=None, *, chunk_size: int | None = None):
    """Patches `model` (a HF decoder LM, or a peft model around one) for Ulysses over `group`
    (default: the world). chunk_size: attend chunk by chunk with seqwrap.ops.chunked_attention."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("seqwrap.parallel.apply_ulysses needs torch.distributed to be initialised")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    group = group or dist.group.WORLD
    config = model.config
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"seqwrap.parallel: found no attention layers in model type "
                         f"{getattr(config, 'model_type', type(model).__name__)!r}")
    heads = getattr(config, "num_attention_heads", None)
    p = dist.get_world_size(group)
    if heads is None or heads % p:
        raise ValueError(f"seqwrap.parallel: {heads} attention heads cannot be split over {p} ranks")
    _register()
    for m in modules:
        m._seqwrap_ulysses = (group, chunk_size)
    model._seqwrap_ulysses_previous = config._attn_implementation
    for cfg in {id(c): c for c in [config] + [m.config for m in model.modules() if hasattr(m, "config")]}.values():
        cfg._attn_implementation = IMPL
    return model


def remove_ulysses(model):
    """Undoes apply_ulysses: the previous attention implementation comes back."""
    previous = getattr(model, "_seqwrap_ulysses_previous", None)
    if previous is None:
        raise ValueError("remove_ulysses: this model was not patched by apply_ulysses")
    for m in _attention_modules(model):
        if hasattr(m, "_seqwrap_ulysses"):
            del m._seqwrap_ulysses
    for cfg in {id(c): c for c in [model.config] + [m.config for m in model.modules() if hasattr(m, "config")]}.values():
        cfg._attn_implementation = previous
    del model._seqwrap_ulysses_previous
    return model
