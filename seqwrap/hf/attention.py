"""seqwrap's entries in transformers' attention registry, and switching a model to them.

Public extension points only: AttentionInterface.register / AttentionMaskInterface.register and
PreTrainedModel.set_attn_implementation. HF's attention modules call a registered function as
fn(module, query, key, value, attention_mask, dropout=..., scaling=..., [sliding_window=...,
softcap=...,] **kwargs) with query (B, Hq, L, D) and key/value (B, Hkv, L, D) after RoPE, where
kwargs carry what the caller passed to the decoder's forward. The chunked engines pass their
K/V store that way (STATE_KWARG): the attention finds its engine state through that explicit
object, never through a module global.

Our implementations build their masks themselves, so the mask function registered for them
returns None: HF then builds no (L, T) mask at all.
"""
from __future__ import annotations

from contextlib import contextmanager

CHUNKED = "seqwrap_chunked"
ULYSSES = "seqwrap_ulysses"
STATE_KWARG = "seqwrap_chunks"

_registered: set[str] = set()


def _no_mask(*args, **kwargs):
    """Mask function of seqwrap's implementations: they mask per block themselves."""
    return None


def register(name: str, fn) -> None:
    """Register `fn` under `name` in transformers' attention and mask registries (once)."""
    if name in _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    _registered.add(name)


def current_implementation(model) -> str | None:
    return model.config._attn_implementation


def set_implementation(model, name: str) -> None:
    """model.set_attn_implementation(name) (the model and its sub-models)."""
    model.set_attn_implementation(name)


@contextmanager
def implementation(model, name: str):
    """Within the block the model's attention runs through the registered function `name`; the
    previous implementation is restored afterwards, also on error."""
    previous = current_implementation(model)
    set_implementation(model, name)
    try:
        yield
    finally:
        set_implementation(model, previous)


# -- the chunked engines' attention -------------------------------------------------------------
def chunked_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                              **kwargs):
    """Attention-registry entry of SeCO / SpaCO (CHUNKED). query (B, Hq, L, D), key/value (B, Hkv, L, D)
    of the current chunk. Returns (attn_output (B, L, Hq, D), None)."""
    from ..engines.seco_attention import attend_chunk

    store = kwargs.get(STATE_KWARG)
    if store is None:
        raise RuntimeError(f"the '{CHUNKED}' attention only runs inside a seqwrap SeCO/SpaCO step (the decoder "
                           f"call did not carry `{STATE_KWARG}` down to the attention)")
    if attention_mask is not None:
        raise ValueError(f"seqwrap: '{CHUNKED}' attention got a prepared attention mask; the chunked engines "
                         "build their masks themselves (pass the 2-D attention_mask to the engine)")
    if dropout and module.training:
        raise ValueError("seqwrap: attention dropout is not supported by the chunked engines; set the model's "
                         "attention_dropout to 0 or call model.eval()")
    sinks = kwargs.get("s_aux")  # gpt-oss & co.: (Hq,) per-head sink logits folded into the softmax, or None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = attend_chunk(store, module.layer_idx, query, key, value, scale, softcap, sinks)  # (B, Hq, L, Dv)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def chunked_attention(model):
    """Within the block `model` attends through chunked_attention_forward (the store comes with each
    decoder call as the STATE_KWARG keyword)."""
    register(CHUNKED, chunked_attention_forward)
    with implementation(model, CHUNKED):
        yield
