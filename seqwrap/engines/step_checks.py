"""The checks of a chunked step, before and during it (SeCO and SpaCO inherit them).

Before the step: the inputs (shapes, dtypes, label range, position limits), so that bad input fails before
any chunk runs. During it: the run-time invariants of each chunk's forward (_check_updates), checked right
after the chunk's pass-1 forward, before any gradient.
"""
from __future__ import annotations

import torch

from ..hf.attention import NeedsConcat
from ..hf.decoder import UnsupportedModelError
from ..labels import shift_labels as shifted
from ..parallel.deepspeed import full_shape
from .kv_store import ChunkKVStore


class StepChecks:
    """Mixed into SeCO: uses self.name, self.adapter, self.ignore_index, self.group, self.chunk_size,
    self.attention and self._world()."""

    def _check_inputs(self, input_ids, labels, attention_mask, position_ids=None, shift_labels=None):
        """(input_ids, shifted labels, attention_mask or None, position_ids or None), (B, T) each, on the
        model's device; shifted[b, t] is the target of position t (ignore_index where there is none)."""
        name = self.name
        if not torch.is_tensor(input_ids):
            raise TypeError(f"seqwrap.{name}: input_ids must be a tensor, not {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"seqwrap.{name}: input_ids must hold integer token ids, not {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            labels, attention_mask, position_ids, shift_labels = (
                t.unsqueeze(0) if torch.is_tensor(t) and t.dim() == 1 else t
                for t in (labels, attention_mask, position_ids, shift_labels))
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"seqwrap.{name}: input_ids must be (batch, seq_len) and non-empty, "
                             f"got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        if shift_labels is not None:
            what, labels = "shift_labels", shift_labels
        else:
            what, labels = "labels", input_ids if labels is None else labels
        for arg, t in ((what, labels), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and (not torch.is_tensor(t) or tuple(t.shape) != shape):
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                hint = " (labels are aligned with input_ids and shifted inside)" if arg == "labels" else ""
                raise ValueError(f"seqwrap.{name}: {arg} shape {got} does not match input_ids shape {shape}{hint}")
        T = shape[1] * self._world()
        limit = self.adapter.max_positions
        if limit is not None and T > limit:
            raise ValueError(f"seqwrap.{name}: input of {T} tokens is longer than the model's limit "
                             f"(max_position_embeddings={limit} for model_type '{self.adapter.model_type}')")
        keep = getattr(self.adapter.config, "keep_window_size", None)
        if isinstance(keep, int) and T > keep:
            raise UnsupportedModelError(
                f"seqwrap.{name}: model_type '{self.adapter.model_type}' masks keys dynamically (top-{keep} per query) "
                f"only in calls with more than keep_window_size={keep} keys; chunks of a {T}-token input would be "
                "masked otherwise than the whole sequence: not supported beyond keep_window_size")
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"seqwrap.{name}: {what} must hold integer class indices, not {labels.dtype}")
        self._check_label_range(labels, what)
        device = self.adapter.lm_head.weight.device
        input_ids = input_ids.to(device)
        labels = labels.to(device=device, dtype=torch.long)
        if shift_labels is None:
            labels = shifted(labels, self.ignore_index)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: same result, and the causal fast path
        if position_ids is not None:
            position_ids = position_ids.to(device=device, dtype=torch.long)
        if self.group is not None:
            world = self._world()
            if attention_mask is not None:
                raise ValueError(f"seqwrap.{name}: padded batches are not supported under Ulysses; pack sequences")
            if position_ids is None or shift_labels is None:
                raise ValueError(f"seqwrap.{name}: under Ulysses pass this rank's shard from "
                                 "seqwrap.parallel.shard_batch(batch, group, chunk_size=...), with its position_ids "
                                 "and shift_labels")
            if self.chunk_size % world:
                raise ValueError(f"seqwrap.{name}: chunk_size {self.chunk_size} is not a multiple of the {world} "
                                 "Ulysses ranks")
        return input_ids, labels, attention_mask, position_ids

    def _check_label_range(self, labels: torch.Tensor, what: str) -> None:
        """Every label is ignore_index or in [0, vocab): checked before the step, so that a bad label
        does not fail the step half way (one reduction over the labels)."""
        vocab = full_shape(self.adapter.lm_head.weight)[0]  # ZeRO-3: the weight is partitioned between steps
        counted = labels[labels != self.ignore_index]
        if counted.numel() == 0:
            return
        lo, hi = int(counted.min()), int(counted.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"seqwrap.{self.name}: {what} holds {bad}, outside [0, {vocab}) (the vocabulary) and "
                             f"not ignore_index ({self.ignore_index})")

    def _check_updates(self, cache: ChunkKVStore, chunk: int) -> None:
        """Run-time invariants of a chunk's forward, checked right after it (pass 1 comes before any gradient):
        every attention layer passed its K/V through the cache once, its attention (chunked mode) went
        through seqwrap's registry entry once, every recurrent layer wrote its state."""
        mtype = self.adapter.model_type
        n = len(cache.updated)
        expected = self.adapter.num_attention_layers
        if n != expected:
            raise UnsupportedModelError(
                f"seqwrap.{self.name} does not support model_type '{mtype}': only {n} of its {expected} attention "
                f"layers passed their keys/values through the HF Cache API (cache.update) in chunk {chunk}")
        updated_twice = sorted(layer for layer, calls in cache.update_calls.items() if calls > 1)
        if updated_twice:
            raise UnsupportedModelError(
                f"seqwrap.{self.name} does not support model_type '{mtype}': its layers {updated_twice} passed "
                f"keys/values through the HF cache more than once in one forward of chunk {chunk}")
        missing = cache.states.missing() if hasattr(cache, "states") else []
        if missing:
            raise UnsupportedModelError(
                f"seqwrap.{self.name} does not support model_type '{mtype}': its recurrent layers "
                f"{missing} did not write their state through the HF cache in chunk {chunk}")
        if self.attention != "chunked":
            return
        twice = sorted(layer for layer, calls in cache.attend_calls.items() if calls > 1)
        if twice:
            reason = (f"calls the attention function more than once per layer (layers {twice}, e.g. DiffLlama's "
                      "two value halves), which the chunked attention's K/V store cannot tell apart")
        elif len(cache.attended) != n:
            reason = (f"runs attention outside transformers' attention-function registry in {n - len(cache.attended)} "
                      f"of its {n} layers")
        else:
            return
        raise NeedsConcat(reason)  # __call__ switches to 'concat' or refuses
