"""Packed rows through a model's own HF forward (MsT: apply_minisequence patches the loss, not attention).

HF's attention separates documents (transformers 5.x, every implementation that builds its masks
through masking_utils: sdpa, eager, flex) only when position_ids restart per document AND the
decoder gets no attention mask AND no cache (a training forward builds a DynamicCache by default,
and then the documents silently attend to each other). Flash-attention implementations read the
boundaries from position_ids / cu_seq_lens_q themselves. `prepare_call` makes a packed call meet
those conditions, or refuses it with the reason; tests/test_hf_compat.py pins HF's behaviour.

    docs = prepare_call(named, extra, what)   # edits `named` in place; docs: Documents or None
"""
from __future__ import annotations

import torch

from ..ops import documents as docs_mod

CACHE_ARGS = ("cache", "past_key_values")


def prepare_call(named: dict, extra: dict, what: str):
    """named: the forward's bound arguments (input_ids / inputs_embeds, attention_mask, position_ids,
    the cache, use_cache, logits_to_keep...); extra: its **kwargs (cu_seq_lens_q / cu_seq_lens_k,
    seq_idx, cu_seqlens, max_length_q / max_length_k). Returns the batch's Documents (None when
    every row is one document), after making `named` a call in which HF's attention keeps them apart."""
    ids = named.get("input_ids")
    ref = ids if ids is not None else named.get("inputs_embeds")
    if ref is None or ref.dim() < 2:
        return None
    shape = tuple(ref.shape[:2])
    mask = named.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2 and bool(mask.all()):
        mask = None  # all ones: no padding, and HF would not look for packed rows next to a mask
    position_ids = named.get("position_ids")
    boundaries = {k: extra.get(k) for k in ("cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k")}
    explicit = {k: v for k, v in boundaries.items() if v is not None}
    docs = docs_mod.resolve(shape, position_ids=position_ids, attention_mask=mask, what=what, **explicit)
    if docs is None:
        return None
    if mask is not None:
        raise ValueError(f"{what}: packed rows with an attention mask: HF's attention keeps documents apart only "
                         "without one (give the padding its own document instead)")
    if position_ids is None:
        named["position_ids"] = docs.positions()
    elif docs_mod.Documents.from_position_ids(position_ids)._rows != docs._rows:
        raise ValueError(f"{what}: position_ids must restart at every document start: HF's attention finds the "
                         "documents from them")
    for name in CACHE_ARGS:
        if named.get(name) is not None:
            raise ValueError(f"{what}: packed rows with a cache ({name}): HF's attention does not keep documents "
                             "apart with one")
    if named.get("use_cache"):
        raise ValueError(f"{what}: packed rows need use_cache=False (with a cache HF's attention does not keep "
                         "documents apart)")
    named["use_cache"] = False
    if named.get("logits_to_keep") not in (None, 0):
        raise ValueError(f"{what}: logits_to_keep is not supported with packed rows and labels")
    named["attention_mask"] = None
    return docs
