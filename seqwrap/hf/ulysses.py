"""Ulysses on a Hugging Face decoder LM: seqwrap's attention-registry entry, apply / remove.

    seqwrap.parallel.apply_ulysses(model, group)      # model.set_attn_implementation("seqwrap_ulysses")
    loss = model(**seqwrap.parallel.shard_batch(batch, group)).loss
    seqwrap.parallel.remove_ulysses(model)            # the previous implementation comes back

Each attention module gets a `_seqwrap_ulysses` UlyssesState (the explicit object the attention
function reads); the computation itself is seqwrap.parallel.ulysses.ulysses_attend.

On an FSDP2 (fully_shard) model, before or after apply_ulysses, a forward pre-hook on the model sets
FSDP2's gradient divide factor at the first forward so that its reduction sums the sequence ranks'
gradients (seqwrap/parallel/ulysses_fsdp.py): `model(**shard).loss.backward()` (MsT included) needs no
scaling. remove_ulysses removes the hook and restores FSDP2's settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops import documents as docs_mod
from ..parallel.ulysses import ulysses_attend
from ..parallel.ulysses_fsdp import configure_reduction, restore_reduction
from . import attention
from .versions import check_model_versions


@dataclass(frozen=True)
class UlyssesState:
    group: object                 # the torch.distributed process group
    chunk_size: int | None        # attend chunk by chunk inside a rank (None: one SDPA call)
    previous: str | None = None   # the attention implementation before apply_ulysses


def ulysses_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, **kwargs):
    """Attention-registry entry (attention.ULYSSES). query (B, Hq, s, D), key/value (B, Hkv, s, D) of the
    local shard. Returns (attn_output (B, s, Hq, D), None)."""
    state = getattr(module, "_seqwrap_ulysses", None)
    if state is None:
        raise RuntimeError("seqwrap ulysses attention called on a module that apply_ulysses did not patch")
    if dropout and module.training:
        raise ValueError("seqwrap.parallel: attention dropout is not supported under Ulysses")
    if attention_mask is not None:
        raise ValueError("seqwrap.parallel: padding masks are not supported under Ulysses; pack sequences instead")
    if kwargs.get("s_aux") is not None:  # gpt-oss & co.: the attention inside a rank has no sink logits
        raise ValueError("seqwrap.parallel: attention sinks (s_aux) are not supported by the plain Ulysses "
                         "attention; train such a model with seqwrap.SeCO / SpaCO over the Ulysses-patched model")
    documents = shard_documents(query, state.group, kwargs)
    out = ulysses_attend(query, key, value, state.group, chunk_size=state.chunk_size, window=sliding_window,
                         scale=scaling, documents=documents)
    return out.transpose(1, 2).contiguous(), None


def shard_documents(query, group, kwargs):
    """The documents of the whole (B, S) sequence from the decoder call's cu_seq_lens_q / cu_seq_lens_k
    (what shard_batch emits for packed rows), or None. A shard whose positions restart without them is
    refused: the attention could not keep its documents apart."""
    world = dist.get_world_size(group)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        shape = (query.shape[0], query.shape[2] * world)
        return docs_mod.resolve(shape, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, infer=False,
                                what="seqwrap.parallel (Ulysses attention)")
    if kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
        raise ValueError("seqwrap.parallel: under Ulysses pass packed boundaries as the cu_seq_lens_q / "
                         "cu_seq_lens_k of the whole sequence, as seqwrap.parallel.shard_batch emits them")
    pos = kwargs.get("position_ids")
    if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[1] > 1 and bool((pos[:, 1:] <= pos[:, :-1]).any()):
        raise ValueError("seqwrap.parallel: this shard's position_ids restart (packed documents) but the call "
                         "carries no document boundaries; build the shard with seqwrap.parallel.shard_batch, "
                         "which adds cu_seq_lens_q / cu_seq_lens_k")
    return None


def attention_modules(model):
    """The attention modules of a HF decoder (they carry layer_idx and a query projection)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and any(
        hasattr(m, name) for name in ("q_proj", "qkv_proj", "query_key_value"))]


def ulysses_group(model):
    """The process group of apply_ulysses if `model` was patched, else None."""
    for m in model.modules():
        state = getattr(m, "_seqwrap_ulysses", None)
        if state is not None:
            return state.group
    return None


def _pretrained(model):
    """The transformers model inside a peft wrapper (set_attn_implementation lives there)."""
    if callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def apply_ulysses(model, group=None, *, chunk_size: int | None = None):
    """Patches `model` (a HF decoder LM, or a peft model around one) for Ulysses over `group`
    (default: the world). chunk_size: attend chunk by chunk with seqwrap.ops.chunked_attention."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("seqwrap.parallel.apply_ulysses needs torch.distributed to be initialised")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_model_versions(model, "seqwrap.parallel.apply_ulysses")
    group = group or dist.group.WORLD
    lm = _pretrained(model)
    config = lm.config
    modules = attention_modules(lm)
    if not modules:
        raise ValueError(f"seqwrap.parallel: found no attention layers in model type "
                         f"{getattr(config, 'model_type', type(model).__name__)!r}")
    heads = getattr(config, "num_attention_heads", None)
    p = dist.get_world_size(group)
    if heads is None or heads % p:
        raise ValueError(f"seqwrap.parallel: {heads} attention heads cannot be split over {p} ranks")
    if ulysses_group(lm) is not None:
        raise ValueError("seqwrap.parallel.apply_ulysses: the model is already patched (remove_ulysses first)")
    state = UlyssesState(group, chunk_size, attention.current_implementation(lm))
    attention.register(attention.ULYSSES, ulysses_attention_forward)
    attention.set_implementation(lm, attention.ULYSSES)
    for m in modules:
        m._seqwrap_ulysses = state

    def fsdp_reduction(module, args):  # FSDP2 applied before or after: set its divide factor (idempotent)
        configure_reduction(module, group, "parallel.apply_ulysses")

    model._seqwrap_ulysses_hook = model.register_forward_pre_hook(fsdp_reduction)
    return model


def remove_ulysses(model):
    """Undoes apply_ulysses: the previous attention implementation comes back."""
    lm = _pretrained(model)
    modules = [m for m in attention_modules(lm) if "_seqwrap_ulysses" in m.__dict__]
    if not modules:
        raise ValueError("remove_ulysses: this model was not patched by apply_ulysses")
    previous = modules[0]._seqwrap_ulysses.previous
    for m in modules:
        del m._seqwrap_ulysses
    hook = model.__dict__.pop("_seqwrap_ulysses_hook", None)
    if hook is not None:
        hook.remove()
    restore_reduction(model)
    attention.set_implementation(lm, previous)
    return model
