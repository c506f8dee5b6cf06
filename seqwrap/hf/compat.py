"""What differs between the transformers versions seqwrap supports, resolved in one place.

Every transformers internal seqwrap relies on is named here (or in the hf/ module that uses it,
with a pointer from this list), and tests/test_hf_compat.py pins each item with one test, so a
release that changes one fails one named test:

  item                      | used by                  | what we rely on
  cache argument            | decoder.py, mst_lm.py    | decoder / CausalLM forward takes the cache as `cache` (>= 5.24)
                            |                          | or `past_key_values` (< 5.24; `cache_params` for Mamba / Mamba2
                            |                          | before 5.2x): resolved from the signature
  output cache field        | mst_lm.py                | output dataclasses hold it as `cache` or `past_key_values`
  layer kinds               | decoder.py               | cache_utils.get_layer_types_and_kwargs(config): kinds + per-layer
                            |                          | kwargs (a list >= 5.20, one dict for all layers before)
  recurrent-state cache API | hybrid_cache.py          | mixers call get_conv_state / get_recurrent_state (>= 5.2x) or
                            |                          | has_previous_state + layers[i].conv_states (5.15), then
                            |                          | update_conv_state(x, layer, conv_kernel_size=k) -> [state ; x] and
                            |                          | update_recurrent_state(final, layer); families: hybrid.py
  Cache contract            | cache.py                 | Cache(layers=[CacheLayerMixin...]); HF calls update(k, v, layer_idx,
                            |                          | ...) once per layer after RoPE, get_seq_length, get_mask_sizes,
                            |                          | get_query_offset, is_sliding
  attention registry        | attention.py, ulysses.py | AttentionInterface.register, AttentionMaskInterface.register,
                            |                          | PreTrainedModel.set_attn_implementation; the attention function
                            |                          | signature fn(module, q, k, v, mask, dropout=, scaling=, **kwargs),
                            |                          | module.layer_idx, and decoder **kwargs reaching it
  checkpoint with cache     | checkpointing.py         | GradientCheckpointingLayer._can_checkpoint_with_cache and the
                            |                          | use_reentrant keyword of _gradient_checkpointing_func
  checkpointing switch      | enable_checkpointing()   | activation_checkpointing_enable (>= 5.23) or
                            |                          | gradient_checkpointing_enable (older, deprecated in 5.23)
  causal-LM loss            | mst_lm.py                | loss_utils.ForCausalLMLoss is model.loss_function, its kwargs
  logits_to_keep            | mst_lm.py                | modeling_utils.slice_logits_to_keep (>= 5.23) or int/index slicing
  packed rows               | packing.py (MsT)         | the attention keeps documents apart from restarting position_ids
                            |                          | only without a mask and without a cache (use_cache=False)
  Mamba internals           | mamba.py                 | MambaForCausalLM.backbone.{embeddings,layers,norm_f}, MambaBlock
                            |                          | {norm,mixer,residual_in_fp32}, MambaMixer parameters and sizes
  rotary modules            | positions.py             | *RotaryEmbedding modules, called as rotary(x, position_ids, [extra])
                            |                          | -> per-position (cos, sin) (..., L, d); the dynamic choice
                            |                          | (longrope / dynamic) made from the call's positions
  attention modules         | attention.py (bound_store)| the module HF hands the attention function has an int layer_idx
  router aux loss           | router_aux.py            | config.output_router_logits; the decoder output's router_logits
                            |                          | ((B*L, experts) per MoE layer); the causal LM's forward adds
                            |                          | `self.<coef> * aux_loss` and returns aux_loss; MoeModelOutputWithPast;
                            |                          | logits_to_keep
  LM head                   | head.py                  | get_output_embeddings(); extra head modules applied as
                            |                          | self.<projection>(self.<module>(hidden_states)) in the forward
  KV sharing                | compat.layer_kinds       | config.num_kv_shared_layers > 0: the last layers reuse earlier K/V
  Trainer internals         | trainer.py               | Trainer.training_step(model, inputs, num_items_in_batch),
                            |                          | Trainer.prediction_step(model, inputs, prediction_loss_only,
                            |                          | ignore_keys) -> (loss, logits, labels),
                            |                          | _prepare_inputs, compute_loss_context_manager,
                            |                          | current_gradient_accumulation_steps, accelerator(.scaler)

Only modules of seqwrap/hf/ import transformers; the engines, ops and parallel/ never do.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from .versions import installed


class UnsupportedModelError(NotImplementedError):
    """The model cannot be trained chunk-wise through the HF Cache API."""


# Families refused by name, with the reason (found by the family census, tests/test_family_census.py).
REFUSED = {
    "moshi": "transformers' layer types call its layers sliding-window (config.sliding_window), but MoshiModel masks "
             "them with a plain causal mask, so the chunked store would apply a window full backprop does not",
    "cpmant": "its attention builds its position bias and mask from the call's own length, not from the cached "
              "past plus the chunk, in either attention mode",
    "recurrent_gemma": "its RG-LRU recurrent blocks keep their state outside the HF cache layers the chunked "
                       "step drives (their cached multi-token path was not checked)",
    "xlstm": "it has no attention; its mLSTM blocks keep their recurrent state in their own xLSTMCache (rnn_state), "
             "not through the HF Cache API that carries one chunk into the next",
    "xlm": "its attention masks from the call's own length, not from the cached past plus the chunk, in either "
           "attention mode",
}

# (family, attention implementation) -> (first transformers release where it is causal, why it is refused before)
NOT_CAUSAL_BEFORE = {
    ("doge", "sdpa"): ("5.24", "with sdpa its full forward is not causal (the dynamic mask it hands SDPA carries no "
                               "causal part), so no chunked step can match it; use attn_implementation='eager' or "
                               "transformers >= 5.24"),
}

# Layer kinds whose attention reads K/V through the cache's update and can be chunked.
ATTENTION_KINDS = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelCompat:
    """Resolved once per model (see resolve()).

    cache_arg: keyword under which the decoder and the causal LM take the cache
    output_cache_field: field of the model outputs holding the cache
    layer_kinds: per decoder layer, one of ATTENTION_KINDS, or of hybrid.STATE_KINDS / STATELESS_KINDS
        (recurrent and cache-less layers of the hybrid families hybrid.py supports)
    sliding_window: the window of the sliding layers (None: no sliding layer)
    """

    transformers_version: str
    cache_arg: str
    output_cache_field: str
    layer_kinds: tuple[str, ...]
    sliding_window: int | None


def resolve(causal_lm, decoder, engine: str) -> ModelCompat:
    """ModelCompat of a *ForCausalLM and its base model (raises UnsupportedModelError with the reason)."""
    config = causal_lm.config
    mtype = getattr(config, "model_type", type(causal_lm).__name__)
    kinds, window = layer_kinds(config, mtype, engine)
    return ModelCompat(installed("transformers") or "?", cache_argument(type(decoder), engine),
                       output_cache_field(), tuple(kinds), window)


# -- cache argument and output field ------------------------------------------------------------
@lru_cache(maxsize=None)
def cache_argument(forward_owner: type, engine: str = "seqwrap") -> str:
    """'cache' or 'past_key_values': the keyword `forward_owner.forward` takes the cache under."""
    params = inspect.signature(forward_owner.forward).parameters
    for name in ("cache", "past_key_values", "cache_params"):  # cache_params: Mamba / Mamba2 < 5.2x
        if name in params:
            return name
    raise UnsupportedModelError(
        f"seqwrap.{engine}: {forward_owner.__name__}.forward takes neither `cache` nor `past_key_values` "
        f"(its parameters: {list(params)[1:]}); it cannot be driven through the HF Cache API")


@lru_cache(maxsize=None)
def output_cache_field() -> str:
    """'cache' (>= 5.24) or 'past_key_values': the cache field of transformers' model outputs."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in fields(CausalLMOutputWithPast)}
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise RuntimeError(f"seqwrap: transformers' CausalLMOutputWithPast has no cache field (fields: {sorted(names)})")


# -- layer kinds ----------------------------------------------------------------------------------
def layer_types_and_kwargs(config) -> tuple[list[str], list[dict]]:
    """(kind per layer, kwargs per layer) from transformers' own resolution of the config.

    get_layer_types_and_kwargs returns one kwargs dict per layer (>= 5.20) or one dict shared by
    every layer (5.15-5.19); this normalises to one per layer. Errors are not caught: if the helper
    moves, the engines refuse the model instead of guessing its layer layout."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, kwargs = get_layer_types_and_kwargs(config)
    kinds = list(kinds)
    if isinstance(kwargs, dict):
        kwargs = [kwargs] * len(kinds)
    kwargs = list(kwargs)
    if len(kwargs) != len(kinds):
        raise RuntimeError(f"seqwrap: get_layer_types_and_kwargs gave {len(kinds)} layer types but {len(kwargs)} "
                           "kwargs; this transformers version is not supported")
    return kinds, kwargs


def layer_kinds(config, mtype: str, engine: str) -> tuple[list[str], int | None]:
    """(per-layer kind in ATTENTION_KINDS, sliding window or None); refuses other layouts by name."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise UnsupportedModelError(f"seqwrap.{engine}: model_type '{mtype}' has no num_hidden_layers in its config")
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    if isinstance(shared, int) and shared > 0:  # (5.2x names those layers "dummy"; 5.15 keeps their kinds)
        raise UnsupportedModelError(
            f"seqwrap.{engine} does not support model_type '{mtype}' with num_kv_shared_layers={shared}: its last "
            f"{shared} layers reuse the keys/values of earlier layers (KV sharing) instead of computing their own, "
            "which the chunked K/V store does not hand over; train it with full backprop, or with "
            "seqwrap.apply_minisequence (MsT) for long sequences")
    try:
        kinds, kwargs = layer_types_and_kwargs(config)
    except (ImportError, AttributeError, TypeError) as exc:
        raise UnsupportedModelError(
            f"seqwrap.{engine}: cannot resolve the layer layout of model_type '{mtype}' with this transformers "
            f"({installed('transformers')}): {type(exc).__name__}: {exc}") from exc
    if len(kinds) < n:
        raise UnsupportedModelError(f"seqwrap.{engine}: model_type '{mtype}' lists {len(kinds)} layer types for "
                                    f"{n} layers")
    kinds, kwargs = kinds[:n], kwargs[:n]
    bad = sorted({k for k in kinds if k not in ATTENTION_KINDS})
    if bad:
        from .hybrid import STATE_KINDS, STATELESS_KINDS, check_family  # recurrent layers: see hybrid.py

        if any(k not in STATE_KINDS + STATELESS_KINDS for k in bad):
            raise UnsupportedModelError(
                f"seqwrap.{engine} does not support model_type '{mtype}': it has layers of type {bad}; only full and "
                "sliding-window attention layers that go through the HF Cache API, and the recurrent layers of the "
                "families listed in seqwrap/hf/hybrid.py, can be chunked")
        check_family(mtype, kinds, engine)
    windows = {kw.get("sliding_window") for k, kw in zip(kinds, kwargs) if k == "sliding_attention"}
    if None in windows:
        raise UnsupportedModelError(f"seqwrap.{engine}: model_type '{mtype}' has sliding layers without a window")
    if len(windows) > 1:
        raise UnsupportedModelError(
            f"seqwrap.{engine}: model_type '{mtype}' has sliding layers with different windows {sorted(windows)}")
    window = windows.pop() if windows else None
    return kinds, window


# -- loss and logits_to_keep ----------------------------------------------------------------------
def causal_lm_loss_function():
    """transformers' ForCausalLMLoss (what model.loss_function is for the MsT families)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """hidden (B, T, H) -> the rows HF projects for `logits_to_keep` (an int: the last n, 0: all; or an index)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # < 5.23: each model file slices inline, the same way
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def causal_lm_output(field: str, **values):
    """CausalLMOutputWithPast with the cache under `field` (output_cache_field(), resolved beforehand so
    that this stays traceable by torch.compile); values name it 'cache'."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    values[field] = values.pop("cache")
    return CausalLMOutputWithPast(**values)


# -- activation checkpointing switch --------------------------------------------------------------
def enable_checkpointing(model, use_reentrant: bool | None = False) -> None:
    """Turns HF activation checkpointing on: activation_checkpointing_enable (>= 5.23) or
    gradient_checkpointing_enable (older; deprecated in 5.23, removed in v6). `model` may be a peft model.
    use_reentrant=None keeps transformers' default (reentrant, which the chunked engines refuse)."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    kw = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def disable_checkpointing(model) -> None:
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if hasattr(inner, "activation_checkpointing_disable"):
        inner.activation_checkpointing_disable()
    else:
        inner.gradient_checkpointing_disable()
