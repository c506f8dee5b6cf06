"""Ulysses on a Hugging Face decoder LM: seqwrap's attention-registry entry, apply / remove.

    seqwrap.parallel.apply_ulysses(model, group)      # model.set_attn_implementation("seqwrap_ulysses")
    loss = model(**seqwrap.parallel.shard_batch(batch, group)).loss
    seqwrap.parallel.remove_ulysses(model)            # the previous implementation comes back

Each attention module gets a `_seqwrap_ulysses` UlyssesState (the explicit object the attention
function reads); the computation itself is seqwrap.parallel.ulysses.ulysses_attend. Each Mamba-2-family
mixer gets a HeadSplit and the head-split forward of mamba2_ulysses.py (the same all-to-all over its SSM
heads); other recurrent mixers (Mamba-1, gated DeltaNet, ...) are refused.

On an FSDP2 (fully_shard) model, before or after apply_ulysses, a forward pre-hook on the model sets
FSDP2's gradient divide factor at the first forward so that its reduction sums the sequence ranks'
gradients (seqwrap/parallel/ulysses_fsdp.py): `model(**shard).loss.backward()` (MsT included) needs no
scaling. remove_ulysses removes the hook and restores FSDP2's settings.

Under a DeepSpeed ZeRO engine (built after apply_ulysses), ZeRO's reduction divides by a number of its
own choosing; deepspeed_ulysses(engine), called once after deepspeed.initialize, makes a plain
`engine.backward(engine(**shard).loss)` (MsT included) sum the sequence ranks' gradients: a forward hook
scales the gradients of the model's outputs by the factor of parallel/ulysses_deepspeed.py. Without that
call, a training forward of the ZeRO-managed model is refused (its gradient would be off by that factor).
The chunked engines (SeCO / SpaCO on the engine) scale their own backwards and never call the model's
top-level forward, so the two never stack.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops import documents as docs_mod
from ..parallel.deepspeed import is_deepspeed_engine
from ..parallel.ulysses import ulysses_attend
from ..parallel.ulysses_deepspeed import reduction_scale, scale_output_grads, zero_managed
from ..parallel.ulysses_fsdp import configure_reduction, restore_reduction
from . import attention
from .mamba2_mixer import mixers as mamba2_mixers
from .mamba2_ulysses import STATE_ATTR as SSM_STATE, head_split, mamba2_ulysses_forward
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
        if state is None:
            state = getattr(m, SSM_STATE, None)
        if state is not None:
            return state.group
    return None


def unsplit_recurrent_modules(model) -> list[str]:
    """Class names of recurrent mixers Ulysses cannot split over heads (a depthwise causal conv, the mark of a
    Mamba / linear-attention mixer, outside the Mamba-2 family of mamba2_mixer.MIXERS)."""
    split = {id(m) for m in mamba2_mixers(model)}
    return sorted({type(m).__name__ for m in model.modules()
                   if id(m) not in split and isinstance(getattr(m, "conv1d", None), torch.nn.Conv1d)})


def split_recurrent_layers(model) -> int:
    """How many Mamba-2 mixers apply_ulysses split over heads."""
    return sum(getattr(m, SSM_STATE, None) is not None for m in mamba2_mixers(model))


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
    mtype = getattr(config, "model_type", type(model).__name__)
    modules = attention_modules(lm)
    ssm = mamba2_mixers(lm)
    other = unsplit_recurrent_modules(lm)
    if other:
        raise ValueError(f"seqwrap.parallel: model type {mtype!r} has recurrent layers ({', '.join(other)}) that "
                         "Ulysses cannot split over heads (only the Mamba-2 family is: "
                         "seqwrap/hf/mamba2_ulysses.py); each rank would run them on its part of the sequence only")
    if not modules and not ssm:
        raise ValueError(f"seqwrap.parallel: found no attention or Mamba-2 layers in model type {mtype!r}")
    heads = getattr(config, "num_attention_heads", None)
    p = dist.get_world_size(group)
    if modules and (heads is None or heads % p):
        raise ValueError(f"seqwrap.parallel: {heads} attention heads cannot be split over {p} ranks")
    if ulysses_group(lm) is not None:
        raise ValueError("seqwrap.parallel.apply_ulysses: the model is already patched (remove_ulysses first)")
    splits = [head_split(m, group) for m in ssm]  # refuses before anything is patched
    state = UlyssesState(group, chunk_size, attention.current_implementation(lm) if modules else None)
    if modules:
        attention.register(attention.ULYSSES, ulysses_attention_forward)
        attention.set_implementation(lm, attention.ULYSSES)
    for m in modules:
        m._seqwrap_ulysses = state
    for m, split in zip(ssm, splits):  # an instance forward: remove_ulysses deletes it again
        setattr(m, SSM_STATE, split)
        m.forward = types.MethodType(mamba2_ulysses_forward, m)

    def fsdp_reduction(module, args):  # FSDP2 applied before or after: set its divide factor (idempotent)
        configure_reduction(module, group, "parallel.apply_ulysses")
        refuse_unscaled_deepspeed(module)

    def deepspeed_scale(module, args, output):  # the factor deepspeed_ulysses(engine) recorded, if any
        scale = module.__dict__.get(_DS_SCALE)
        if scale is None or scale == 1.0 or not torch.is_grad_enabled():
            return None
        return scale_output_grads(output, scale)

    model._seqwrap_ulysses_hook = model.register_forward_pre_hook(fsdp_reduction)
    model._seqwrap_ulysses_ds_hook = model.register_forward_hook(deepspeed_scale)
    return model


_DS_SCALE = "_seqwrap_deepspeed_scale"


def refuse_unscaled_deepspeed(module) -> None:
    """Raises when a training forward (grad enabled) runs on a Ulysses module whose parameters a DeepSpeed
    ZeRO optimizer manages but deepspeed_ulysses(engine) was not called: engine.backward would leave
    ZeRO's divisor, not the sum over the sequence ranks. Every rank of the group raises alike."""
    if not torch.is_grad_enabled() or _DS_SCALE in module.__dict__:
        return
    stage = zero_managed(module)
    if stage:
        p = dist.get_world_size(ulysses_group(module))
        raise RuntimeError(
            f"seqwrap.parallel: this Ulysses-patched model is trained by a DeepSpeed ZeRO-"
            f"{'1/2' if stage == 12 else 3} engine, whose reduction divides the summed gradients by a number of "
            f"its own (without a sequence-parallel mpu the gradient of engine.backward(loss) would be 1/{p} of "
            "the whole sequence's): call seqwrap.parallel.deepspeed_ulysses(engine) once after "
            "deepspeed.initialize, or train through seqwrap.SeCO(engine) / seqwrap.SpaCO(engine)")


def deepspeed_ulysses(engine) -> float:
    """Makes a plain `engine.backward(loss)` of an apply_ulysses-patched model exact under its DeepSpeed
    ZeRO engine (call once, after deepspeed.initialize): the model's outputs scale their gradients by
    s = D * P / N (parallel/ulysses_deepspeed.py), so ZeRO's reduction sums the sequence ranks and averages
    the data-parallel replicas. Returns s. Raises naming the problem for a setup no factor makes exact
    (the same checks as SeCO(engine)). Parameter gradients that do not flow through the model's outputs
    (a penalty on the weights added to the loss outside the model) are not scaled."""
    if not is_deepspeed_engine(engine):
        raise TypeError(f"seqwrap.parallel.deepspeed_ulysses expects a deepspeed.DeepSpeedEngine, got "
                        f"{type(engine).__name__}")
    patched = [m for m in engine.module.modules() if "_seqwrap_ulysses_hook" in m.__dict__]
    if not patched:
        raise ValueError("seqwrap.parallel.deepspeed_ulysses: the engine's module was not patched by apply_ulysses "
                         "(call apply_ulysses(model, group) before deepspeed.initialize)")
    scale = reduction_scale(engine, ulysses_group(patched[0]), "parallel.deepspeed_ulysses")
    for m in patched:
        setattr(m, _DS_SCALE, float(scale))
    return float(scale)


def remove_ulysses(model):
    """Undoes apply_ulysses: the previous attention implementation comes back."""
    lm = _pretrained(model)
    modules = [m for m in attention_modules(lm) if "_seqwrap_ulysses" in m.__dict__]
    ssm = [m for m in mamba2_mixers(lm) if SSM_STATE in m.__dict__]
    if not modules and not ssm:
        raise ValueError("remove_ulysses: this model was not patched by apply_ulysses")
    for m in ssm:
        delattr(m, SSM_STATE)
        m.__dict__.pop("forward", None)
    if modules:
        previous = modules[0]._seqwrap_ulysses.previous
        for m in modules:
            del m._seqwrap_ulysses
    for name in ("_seqwrap_ulysses_hook", "_seqwrap_ulysses_ds_hook"):
        hook = model.__dict__.pop(name, None)
        if hook is not None:
            hook.remove()
    model.__dict__.pop(_DS_SCALE, None)
    restore_reduction(model)
    if modules:
        attention.set_implementation(lm, previous)
    return model
