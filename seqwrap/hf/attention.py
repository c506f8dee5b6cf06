"""seqwrap's entries in transformers' attention registry, and switching a model to them.

Public extension points only: AttentionInterface.register / AttentionMaskInterface.register and
PreTrainedModel.set_attn_implementation. HF's attention modules call a registered function as
fn(module, query, key, value, attention_mask, dropout=..., scaling=..., [sliding_window=...,
softcap=...,] **kwargs) with query (B, Hq, L, D) and key/value (B, Hkv, L, D) after RoPE, where
kwargs carry what the caller passed to the decoder's forward. The chunked engines do not rely on
those kwargs (StableLM's and Nemotron's decoder layers drop them): for the duration of a step the
engine's K/V store is bound to every module of the model that has a `layer_idx` (bound_store), and
the attention function finds it on the module it is called with, an explicit object, never a module
global.

Our implementations build their masks themselves, so the mask function registered for them
returns None: HF then builds no (L, T) mask at all.
"""
from __future__ import annotations

from contextlib import contextmanager

from .compat import UnsupportedModelError

CHUNKED = "seqwrap_chunked"
ULYSSES = "seqwrap_ulysses"
STORE_ATTR = "_seqwrap_chunk_store"  # attribute holding the step's store on each attention module

_registered: set[str] = set()


class NeedsConcat(UnsupportedModelError):
    """The model's attention cannot run on the chunked store (reason: what it does), while the 'concat'
    mode (HF's own attention over [past ; fresh] K/V) is exact for it. An engine built with attention=None
    switches to 'concat' when this comes before any gradient of its first step; otherwise it is refused."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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

    store = getattr(module, STORE_ATTR, None)
    if store is None:
        raise RuntimeError(f"the '{CHUNKED}' attention only runs inside a seqwrap SeCO/SpaCO step (module "
                           f"{type(module).__name__} has no bound chunk store: it has no `layer_idx`, or it was "
                           "called outside the engine's step)")
    if attention_mask is not None:  # seqwrap's mask function returns None: the layer built this mask itself
        raise NeedsConcat(f"builds its own attention mask in {type(module).__name__} (as Doge's dynamic mask), which "
                          "the chunked attention cannot apply")
    if dropout and module.training:
        raise ValueError("seqwrap: attention dropout is not supported by the chunked engines; set the model's "
                         "attention_dropout to 0 or call model.eval()")
    sinks = kwargs.get("s_aux")  # gpt-oss & co.: (Hq,) per-head sink logits folded into the softmax, or None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = attend_chunk(store, module.layer_idx, query, key, value, scale, softcap, sinks)  # (B, Hq, L, Dv)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def chunked_attention(model):
    """Within the block `model` attends through chunked_attention_forward (the store is bound to its
    attention modules by bound_store)."""
    register(CHUNKED, chunked_attention_forward)
    with implementation(model, CHUNKED):
        yield


@contextmanager
def bound_store(model, store):
    """Within the block every module of `model` with an int `layer_idx` (the attention modules HF hands
    the attention function, and some decoder layers) holds `store` as STORE_ATTR; removed afterwards,
    also on error. The store then reaches the attention whatever the decoder layers forward."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    for m in modules:
        m.__dict__[STORE_ATTR] = store
    try:
        yield modules
    finally:
        for m in modules:
            m.__dict__.pop(STORE_ATTR, None)
