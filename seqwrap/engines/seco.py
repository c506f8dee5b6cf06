"""SeCO: exact chunk-wise training of Hugging Face causal LMs (Li et al. 2025).

    engine = seqwrap.SeCO(model, chunk_size=2048)
    out = engine(input_ids, labels=labels, attention_mask=mask)   # forward + backward
    optimizer.step()

Pass 1 (no grad) runs the chunks in order and keeps each layer's K/V per chunk
(ChunkKVStore). Pass 2 runs the chunks in reverse: chunk i is recomputed with
grad, attending to the stored K/V of earlier chunks plus its own fresh K/V;
one backward takes its loss and the gradient already relayed onto its K/V by
later chunks, and relays gradient onto the K/V of earlier chunks. Chunk i's
K/V and relayed gradients are freed when it is done. At most one chunk's
activations and logits are alive at a time.

SpaCO (spaco.py) is this engine with a chunk sampler: it overrides
`chunk_weights`, the factor of each chunk's backward (0 = not recomputed).
"""
from __future__ import annotations

import math
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .._warn import user_stacklevel
from ..hf.attention import NeedsConcat
from ..hf.decoder import HFDecoderAdapter, UnsupportedModelError, unwrap_ddp
from ..hf.positions import has_dynamic_rope, rope_types
from ..hf.router_aux import RouterAux, aux_coefficient, wants_router_logits
from ..ops.dtypes import real_dtype
from ..parallel.deepspeed import deepspeed_step_for
from ..parallel.agreement import agree_step, agreement_group, selection_fingerprint, shard_fingerprint
from ..parallel.fsdp import FSDPSchedule, fsdp_step_for
from ..parallel.grad_sync import (keep_grads, reduce_step, restore_grads, rollback_grads, stash_grads,
                                  sync_ddp_gradients, unstash_grads)
from ..parallel.ulysses_deepspeed import reduction_scale
from ..parallel.ulysses_fsdp import ulysses_fsdp_setup
from ..planning.auto import AutoChunk, announce
from . import objective as seq_objective
from .chunk_loss import chunk_logp_rows, chunk_loss_sum
from .evaluate import forward_only
from .hybrid_store import make_store
from .offload import Transfers, default_pool, park_activations
from .packing import prepare as prepare_packed
from .step_checks import StepChecks


_BOUNDARY_KEYS = frozenset({"cu_seqlens", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


@dataclass
class _Step:
    """One step's checked inputs: ids / shift (shifted labels) / mask / pos (B, T) on the model's device
    (mask, pos may be None), docs (packed-row documents or None), norm (the loss normaliser),
    bounds [(start, end)) of the chunks on this rank, valid (B, T) bool: labels that count."""

    ids: torch.Tensor
    shift: torch.Tensor
    mask: torch.Tensor | None
    pos: torch.Tensor | None
    docs: object
    norm: float
    bounds: list
    valid: torch.Tensor


@dataclass
class StepResult:
    """What one engine call did.

    loss:      detached, the step's loss as HF computes it (sum of token losses / normaliser)
    num_tokens: input tokens processed (non-padding tokens when attention_mask is given)
    num_items: the normaliser (non-ignored labels of the step, or `num_items` when given)
    num_chunks: chunks the sequence was split into
    backward_chunks: chunks recomputed with grad (SeCO: all of them)
    sequence_logps: with objective= (or from sequence_logps()): S, (B,) float64, each row's sum of the
               log-probabilities of its counted labels (engines/objective.py); None otherwise
    """

    loss: torch.Tensor
    num_tokens: int
    num_items: float
    num_chunks: int
    backward_chunks: int
    sequence_logps: torch.Tensor | None = None


class SeCO(StepChecks):
    """Exact chunk-wise forward + backward for a HF decoder-only causal LM.

    model: a *ForCausalLM (or a peft PeftModel of one, or a DDP wrapper of either), optionally
        patched by seqwrap.parallel.apply_ulysses (sequence parallelism: see __call__); or a
        DeepSpeedEngine around one (ZeRO-1/2/3, Ulysses too: seqwrap/parallel/deepspeed.py and
        ulysses_deepspeed.py).
    chunk_size: tokens per chunk (> 0); the last chunk may be shorter. Under Ulysses, tokens
        of the whole sequence per chunk (each of the P ranks holds chunk_size / P of them).
        "auto" (or seqwrap.AutoChunk(device_memory=..., ...)): seqwrap.plan picks it at the first
        step from its length and the free memory, with this engine's offload and the model's
        gradient checkpointing as they are (planning/auto.py); .plan holds that plan.
    attention: "chunked": the recompute reads the past K/V block by block through the
        LSE-merging attention (seco_attention.py), never concatenating it; "concat": the cache
        hands HF's own attention [past ; fresh] K/V (models whose attention does not go through
        transformers' attention-function registry, or calls it more than once per layer).
        None (default): "chunked", unless the first chunk of the first step shows that the model
        needs "concat" (checked before any gradient): then "concat" from then on, with a warning.
    offload: keep past K/V and their relayed gradients in (pinned) host memory, prefetched one
        chunk ahead on a side CUDA stream, and park the tensors the recompute saves for backward
        (with HF gradient checkpointing: the checkpointed layers' inputs) on the host too.
        offload_min_bytes: smaller saved tensors stay on the device.
    ignore_index: label value that does not count (default -100).
    fsdp: for an FSDP2 (`fully_shard`) model, a seqwrap.FSDPSchedule (default: all-gather once and
        reduce-scatter once per step; see seqwrap/parallel/fsdp.py). With Ulysses as well: FSDP2's mesh made of
        whole Ulysses groups; SpaCO on several of them takes the default schedule only
        (seqwrap/parallel/ulysses_fsdp.py).
    On several ranks (DDP, FSDP2, Ulysses) every step begins with one tiny all-reduce in which the ranks
    agree on their input checks and chunks (seqwrap/parallel/agreement.py).
    """

    name = "SeCO"
    exact_loss = True  # SpaCO(exact_loss=False) reports the unbiased estimate instead

    def __init__(self, model: nn.Module, chunk_size: int = 2048, *, ignore_index: int = -100,
                 attention: str | None = None, offload: bool = False, offload_min_bytes: int = 1 << 20,
                 fsdp: FSDPSchedule | None = None, **options):
        if options:
            raise TypeError(f"seqwrap.{self.name}: unknown option(s) {sorted(options)}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"seqwrap.{self.name}: model must be a torch.nn.Module (a Hugging Face causal LM), "
                            f"not {type(model).__name__}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -2**63 <= ignore_index < 2**63:
            raise TypeError(f"seqwrap.{self.name}: ignore_index must be an int (int64), not {ignore_index!r}")
        # chunk_size="auto" / AutoChunk(...): planned at the first step (planning/auto.py)
        self._auto_chunk = AutoChunk() if isinstance(chunk_size, str) and chunk_size == "auto" else (
            chunk_size if isinstance(chunk_size, AutoChunk) else None)
        if self._auto_chunk is not None:
            chunk_size = None
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"seqwrap.{self.name}: chunk_size must be an int, 'auto' or a seqwrap.AutoChunk, not "
                            f"{chunk_size!r}")
        elif chunk_size <= 0:
            raise ValueError(f"seqwrap.{self.name}: chunk_size must be > 0, got {chunk_size}")
        self.plan = None  # chunk_size="auto": the seqwrap.Plan of the first step
        if attention not in (None, "chunked", "concat"):
            raise ValueError(f"seqwrap.{self.name}: attention must be 'chunked' or 'concat', got {attention!r}")
        self._auto_attention = attention is None  # "chunked" until the first chunk shows "concat" is needed
        self._backward_ran = False
        attention = attention or "chunked"
        if offload and attention != "chunked":
            raise ValueError(f"seqwrap.{self.name}: offload=True needs attention='chunked'")
        if isinstance(offload_min_bytes, bool) or not isinstance(offload_min_bytes, int) or offload_min_bytes < 0:
            raise ValueError(f"seqwrap.{self.name}: offload_min_bytes must be an int >= 0, got {offload_min_bytes!r}")
        # DeepSpeed ZeRO: given the engine, the step runs inside self._deepspeed.step() (parallel/deepspeed.py)
        self._deepspeed = deepspeed_step_for(model, self.name)
        model = model if self._deepspeed is None else self._deepspeed.module
        if self._deepspeed is None and any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(f"seqwrap.{self.name}: this model's parameters are partitioned by DeepSpeed ZeRO-3; pass "
                             f"the DeepSpeedEngine itself (seqwrap.{self.name}(engine, ...)), so that the step gathers "
                             "them once and reduces once (a bare module would leave that to ZeRO-3's per-call hooks)")
        self.model = model
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.attention = attention
        self.offload = bool(offload)
        self.offload_min_bytes = offload_min_bytes
        self.adapter = HFDecoderAdapter.from_model(model, self.name)
        self._ddp = unwrap_ddp(model)[1]
        self.group = self.adapter.ulysses_group()
        if self.group is not None and attention != "chunked":
            raise ValueError(f"seqwrap.{self.name}: a model patched for Ulysses needs attention='chunked'")
        if self.group is not None and self._auto_chunk is not None:
            raise ValueError(f"seqwrap.{self.name}: chunk_size='auto' is not supported under Ulysses (shard_batch needs "
                             "the chunk size before the first step): pass the chunk_size of seqwrap.plan(model, "
                             "seq_len, world_size=...)")
        # FSDP2: the step runs inside self._fsdp.step() (see _train_step)
        self._fsdp = fsdp_step_for(model, fsdp, self.name)
        # Ulysses on an FSDP2 model: FSDP2's divide factor becomes the number of data-parallel replicas, so
        # its reduction sums the sequence ranks (parallel/ulysses_fsdp.py); the backward is not scaled
        if self._fsdp is not None and self.group is not None:
            ulysses_fsdp_setup(model, self._fsdp, self.group, self.name,
                               sampled=type(self).chunk_weights is not SeCO.chunk_weights)
        # Ulysses under a DeepSpeed engine: ZeRO reduces (and divides) the gradients; the chunk backwards are
        # scaled so that its reduction sums the sequence ranks (parallel/ulysses_deepspeed.py)
        self._reduction_scale = 1.0
        if self._deepspeed is not None and self.group is not None:
            self._reduction_scale = reduction_scale(self._deepspeed.engine, self.group, self.name)
        self.adapter.check_recurrent(self.name, attention, chunk_size or self._auto_chunk.smallest, self.group is not None)
        self.adapter.check_structure(self.name)
        self.adapter.check_head(self.name)
        self._router_aux = wants_router_logits(self.adapter.causal_lm)
        if self._router_aux:
            aux_coefficient(self.adapter.causal_lm, self.name)  # refused now if it cannot be read
            if self.group is not None:
                raise UnsupportedModelError(f"seqwrap.{self.name}: the router auxiliary loss (output_router_logits="
                                            "True) is not supported under Ulysses yet: set output_router_logits=False")
        if self.group is not None and has_dynamic_rope(self.adapter.causal_lm):
            raise UnsupportedModelError(
                f"seqwrap.{self.name}: model_type '{self.adapter.model_type}' uses a rotary embedding chosen per call "
                f"({sorted(rope_types(self.adapter.causal_lm))}); under Ulysses each rank sees only its positions, "
                "so the choice could differ from full backprop: not supported yet")
        self.pool = default_pool() if self.offload else None
        self._xfer = None
        # with offload, per step: host_peak_bytes / host_reserved_bytes (the pool), parked_bytes,
        # parked_live_bytes, parked_peak_bytes (activations parked on the host, see park_activations)
        self.offload_stats: dict = {}
        self.step = 0

    # -- what SpaCO overrides ------------------------------------------------
    def chunk_weights(self, label_counts: list[int]) -> list[float]:
        """Factor on each chunk's backward (own loss + relayed gradient); 0 skips the chunk."""
        return [1.0] * len(label_counts)

    # -- one step --------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, num_items=None, loss_scale: float = 1.0,
                 position_ids: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                 num_items_in_batch=None, objective=None, **boundaries) -> StepResult:
        """Forward and backward of the whole sequence; parameter .grad accumulates as
        `model(input_ids, labels=labels, attention_mask=attention_mask).loss.backward()` would.

        input_ids, labels, attention_mask: (B, T) (or (T,)); labels=None means labels=input_ids.
        num_items: normaliser of the summed token losses (HF's num_items_in_batch, also accepted
                   under that name); default the number of non-ignored labels of the step.
        loss_scale: extra factor on the gradients (not on the returned loss), e.g. 1/accumulation.
        position_ids: (B, T) positions for the rotary embeddings (default 0..T-1).
        shift_labels: (B, T) labels already shifted (shift_labels[b, t] is the target of position t);
                   replaces labels.
        Under Ulysses, pass this rank's part from seqwrap.parallel.shard_batch(batch, group,
        chunk_size=chunk_size) (`engine(**shard)`): loss and gradients are those of the whole
        sequence on every rank (parameter gradients are summed over the group once per step).
        Packed rows (several documents each; engines/packing.py): position_ids restarting per
        document, or explicit boundaries: cu_seqlens (cumulative lengths over the flattened batch),
        seq_idx (B, T), or DataCollatorWithFlattening's cu_seq_lens_q / cu_seq_lens_k (max_length_q /
        max_length_k are accepted and not needed). `engine(**collator(features))` works as it is.

        objective: fn(S) -> 0-d tensor, a sequence-level loss of S, the (B,) float64 per-row sums of the
                   log-probabilities of the counted labels (engines/objective.py): the step's loss is fn(S) and
                   the gradients are those of full backprop of fn(S) (loss_scale applies; num_items does not).
                   Per-row constants (reference log-probs, lengths) come in through fn's closure.

        Under torch.no_grad() / torch.inference_mode() the call is `evaluate(...)`: pass 1 only, no
        gradient written (loss_scale does not apply).
        """
        if not torch.is_grad_enabled():
            return self.evaluate(input_ids, labels, attention_mask, num_items=num_items, position_ids=position_ids,
                                 shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                                 objective=objective, **boundaries)
        return self._train_step(input_ids, labels, attention_mask, num_items=num_items, loss_scale=loss_scale,
                                position_ids=position_ids, shift_labels=shift_labels,
                                num_items_in_batch=num_items_in_batch, objective=objective, **boundaries)

    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, num_items=None,
                 position_ids: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                 num_items_in_batch=None, objective=None, **boundaries) -> StepResult:
        """Forward only, chunk by chunk: the loss full forward gives (`model(...).loss`, router auxiliary
        term included) and the token counts, for sequences far longer than one forward fits. Same
        arguments as __call__; writes no gradient, keeps one chunk's activations and the past K/V
        (SpaCO: every chunk counts, no draw is made). With objective=fn: the loss is fn(S), and
        sequence_logps is S (see sequence_logps())."""
        if self._fsdp is not None:
            raise NotImplementedError(f"seqwrap.{self.name}: forward-only evaluation of an FSDP2 model is not "
                                      "supported yet; evaluate with the model itself")
        # Under Ulysses the checks run first and the ranks agree (as in a training step) before the
        # label-count all-reduce and the all-to-alls: a refused input raises on every rank.
        st = error = None
        try:
            st = self._prepare(input_ids, labels, attention_mask, num_items, position_ids, shift_labels,
                               num_items_in_batch, boundaries, reduce=False)
            if objective is not None:
                seq_objective.refuse(self, objective, num_items if num_items is not None else num_items_in_batch,
                                     st.docs, sampled=False)  # forward only: every chunk counts
        except Exception as e:  # noqa: BLE001 - re-raised by agree_step, on every rank
            error = e
        group = agreement_group(ulysses=self.group)
        agreed = agree_step(self.name, group, error=error, num_chunks=0 if st is None else len(st.bounds),
                            shard=self._shard_key(st))
        agreed.refuse_unequal_shards(self.name, group, self.group)  # one all-to-all per layer and chunk
        st.norm = self._finish_norm(st)
        total, extra, rows = forward_only(self, st, rows=objective is not None)
        if objective is not None:
            extra, _ = seq_objective.weights(objective, rows, self.name)
        return self._result(st, total, extra, backward_chunks=0, rows=rows)

    def sequence_logps(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                       shift_labels: torch.Tensor | None = None) -> torch.Tensor:
        """S, (B,) float64: each row's sum of the log-probabilities of its counted labels, chunk by chunk
        without grad (e.g. a reference model's log-probs for a preference loss). Arguments as __call__."""
        with torch.no_grad():
            return self.evaluate(input_ids, labels, attention_mask, position_ids=position_ids,
                                 shift_labels=shift_labels, objective=_sum).sequence_logps

    def _train_step(self, input_ids, labels=None, attention_mask=None, *, num_items=None, loss_scale=1.0,
                    position_ids=None, shift_labels=None, num_items_in_batch=None, objective=None,
                    **boundaries) -> StepResult:
        # Local preparation (checks, chunking, the draw), then the ranks agree (parallel/agreement.py: one
        # tiny all-reduce) before any collective: a refused input raises on every rank, and a schedule
        # whose collectives depend on the chunks only runs when every rank has the same chunks.
        st = weights = error = None
        try:
            if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
                raise ValueError(f"seqwrap.{self.name}: loss_scale must be a finite number, got {loss_scale!r}")
            st = self._prepare(input_ids, labels, attention_mask, num_items, position_ids, shift_labels,
                               num_items_in_batch, boundaries, reduce=False)
            if objective is not None:
                seq_objective.refuse(self, objective, num_items if num_items is not None else num_items_in_batch,
                                     st.docs, sampled=type(self).chunk_weights is not SeCO.chunk_weights)
            if self.group is None:  # the draw is local (under Ulysses it needs the group's label counts)
                weights = self._draw(st)
        except Exception as e:  # noqa: BLE001 - re-raised by agree_step, on every rank
            error = e
        group = agreement_group(fsdp=self._fsdp, ddp=self._ddp, ulysses=self.group, deepspeed=self._deepspeed)
        agreed = agree_step(self.name, group, error=error, num_chunks=0 if st is None else len(st.bounds),
                            fingerprint=0 if weights is None else
                            selection_fingerprint([i for i, w in enumerate(weights) if w != 0.0]),
                            shard=self._shard_key(st))
        # Under Ulysses every layer of every chunk runs all-to-alls over the group: its ranks must hold
        # equal splits (data-parallel replicas beside it may hold other lengths).
        agreed.refuse_unequal_shards(self.name, group, self.group)
        if self.group is not None:
            st.norm = self._finish_norm(st)
            weights = self._draw(st)
        if self._fsdp is not None:
            with self._fsdp.step(self._fsdp.schedule_for(agreed)):
                return self._run_step(st, weights, loss_scale, objective)
        if self._deepspeed is not None:  # ZeRO: gather once (stage 3), one coalesced reduction at the end
            with self._deepspeed.step():
                return self._run_step(st, weights, loss_scale, objective)
        return self._run_step(st, weights, loss_scale, objective)

    def _shard_key(self, st: "_Step | None") -> tuple[int, int]:
        """(shard fingerprint, local length) of this rank's input for the agreement; (0, 0) when there is
        no Ulysses group or the preparation failed."""
        if self.group is None or st is None:
            return (0, 0)
        return (shard_fingerprint(st.ids.shape[0], st.ids.shape[1], st.bounds), st.ids.shape[1])

    def _draw(self, st: "_Step") -> list[float]:
        """Each chunk's backward factor (chunk_weights of the chunks' label counts, summed over the Ulysses
        group; rank 0's draw under Ulysses)."""
        counts = self._group_sum(torch.stack([st.valid[:, s:e].sum() for s, e in st.bounds])).tolist()
        return self._same_on_all_ranks([float(w) for w in self.chunk_weights([int(c) for c in counts])])

    def _run_step(self, st: "_Step", weights: list[float], loss_scale: float, objective) -> StepResult:
        ids, shift, mask, pos, docs, norm, bounds = st.ids, st.shift, st.mask, st.pos, st.docs, st.norm, st.bounds
        group = self.group
        selected = [i for i, w in enumerate(weights) if w != 0.0]
        self.step += 1

        adapter = self.adapter
        xfer = self._transfers(ids.device) if self.offload else None
        # A failed step leaves .grad as it was. On one rank the step accumulates straight into .grad and
        # keeps only what a rollback needs (keep_grads: nothing when .grad starts None or zeroed, else one
        # copy). Under Ulysses the step's own gradients are summed over the group (reduce_step), so they
        # accumulate apart from earlier ones (stash_grads) and are added back after the reduction.
        params = self._params()
        cuda_dev = ids.device if ids.device.type == "cuda" else None
        rng_at_start = _rng_state(cuda_dev) if self._auto_attention else None
        # Under a DeepSpeed engine ZeRO reduces after the step (DeepSpeedStep), so the step accumulates
        # straight into .grad there, Ulysses or not.
        apart = group is not None and self._deepspeed is None
        kept = keep_grads(params) if not apart else None
        while True:
            cache = self._make_store(st, xfer, selected)
            stash = stash_grads(params) if apart else None
            if self.pool is not None:
                self.pool.reset_peak()
            try:
                with adapter.step_context(self.name, cache, pos, chunked=self.attention == "chunked"):
                    total, extra, rows = self._passes(ids, shift, mask, pos, cache, bounds, weights, selected, norm,
                                                      loss_scale * self._reduction_scale, xfer, objective)
                if group is not None and (self._fsdp is not None or self._deepspeed is not None):  # they reduce
                    total = self._group_sum(total)
                elif group is not None:
                    total = reduce_step(params, group, total)
            except NeedsConcat as switch:
                self._undo_grads(params, kept, stash)
                self._concat_or_refuse(switch, docs, gradient_touched=self._backward_ran)
                _set_rng_state(rng_at_start, cuda_dev)
                continue
            except BaseException:
                self._undo_grads(params, kept, stash)
                raise
            finally:
                cache.release_all()
            break
        self._auto_attention = False  # the first step decided
        del kept
        if stash is not None:
            unstash_grads(params, stash)
        if self._ddp is not None:
            sync_ddp_gradients(self._ddp)
        if self.pool is not None:
            self.offload_stats.update(host_peak_bytes=self.pool.peak_in_use, host_reserved_bytes=self.pool.reserved)
        return self._result(st, total, extra, backward_chunks=len(selected), rows=rows)

    @staticmethod
    def _undo_grads(params, kept, stash) -> None:
        """A failed step: .grad back to what it was (kept: keep_grads, one rank; stash: stash_grads, Ulysses)."""
        if kept is not None:
            rollback_grads(params, kept)
        else:
            restore_grads(params, stash)

    def _result(self, st: "_Step", total: torch.Tensor, extra, backward_chunks: int, rows=None) -> StepResult:
        """total: summed token losses (float64 0-d); extra: auxiliary loss terms (not normalised; with an
        objective: fn(S), total is then 0); rows: S (B,) float64 with an objective, else None."""
        B, T = st.ids.shape
        num_tokens = int(st.mask.sum()) if st.mask is not None else B * T
        loss_dtype = real_dtype(self.adapter.lm_head.weight.dtype)
        return StepResult((total / st.norm + extra).to(loss_dtype), num_tokens, st.norm, len(st.bounds),
                          backward_chunks, rows)

    def _prepare(self, input_ids, labels, attention_mask, num_items, position_ids, shift_labels, num_items_in_batch,
                 boundaries, reduce: bool = True) -> "_Step":
        """Checked inputs of one step, its normaliser and chunk bounds (shared by training and evaluation).
        reduce=False: no collective; under Ulysses without num_items, norm is then this rank's label count
        until _finish_norm sums it over the group."""
        unknown = sorted(set(boundaries) - _BOUNDARY_KEYS)
        if unknown:
            raise TypeError(f"seqwrap.{self.name}: unexpected keyword argument(s) {unknown}")
        if num_items_in_batch is not None:
            if num_items is not None:
                raise TypeError(f"seqwrap.{self.name}: pass num_items or num_items_in_batch, not both")
            num_items = num_items_in_batch
        ids, shift, mask, pos = self._check_inputs(input_ids, labels, attention_mask, position_ids, shift_labels)
        if self.chunk_size is None:  # chunk_size="auto": planned now that the length is known (training's plan)
            self.plan = self._auto_chunk.resolve(self, ids)
            self.chunk_size = self.plan.chunk_size
            announce(self, self.plan)
        boundaries = {k: boundaries.get(k) for k in sorted(_BOUNDARY_KEYS)}
        docs, pos, shift = prepare_packed(self.name, ids, shift, mask, pos, boundaries, group=self.group,
                                          chunk_size=self.chunk_size, ignore_index=self.ignore_index,
                                          attention=self.attention)
        T = ids.shape[1]
        valid = shift != self.ignore_index
        if num_items is None:
            norm = None if not reduce and self.group is not None else float(self._group_sum(valid.sum())) or 1.0
        else:
            norm = float(num_items.item() if torch.is_tensor(num_items) else num_items)
            if not norm > 0:
                raise ValueError(f"seqwrap.{self.name}: num_items must be > 0, got {num_items}")
        # norm 1.0 when no label at all: loss 0, no gradient (HF would give nan)
        C = self.chunk_size // self._world()  # tokens of each chunk on this rank
        bounds = [(s, min(s + C, T)) for s in range(0, T, C)]
        if self.adapter.recurrent_layers and self.group is None:  # Ulysses: the head-split mixers (hf/mamba2_ulysses)
            bounds = _no_single_token_tail(bounds)                 # see the whole chunk and have no one-token path
        if docs is not None and self.adapter.recurrent_layers:
            # the recurrent layers' state would flow from one document into the next
            raise NotImplementedError(f"seqwrap.{self.name}: packed rows (several documents per row) are not supported "
                                      "for models with recurrent layers yet: their state is not reset at document "
                                      "starts inside a chunked step; pass one document per row")
        return _Step(ids, shift, mask, pos, docs, norm, bounds, valid)

    def _finish_norm(self, st: "_Step") -> float:
        """The normaliser, once the ranks have agreed: the group's label count (when num_items was not given)."""
        if st.norm is not None:
            return st.norm
        return float(self._group_sum(st.valid.sum())) or 1.0

    def _make_store(self, st: "_Step", xfer, replayed=None):
        """The K/V (and recurrent-state) store of one step; replayed: the chunks pass 2 replays (None: all)."""
        adapter = self.adapter
        return make_store(adapter.recurrent_layers, st.bounds, [k == "sliding_attention" for k in adapter.layer_kinds],
                          adapter.sliding_window, attention=self.attention,
                          key_padding=None if st.mask is None else st.mask.bool(), offload=xfer,
                          positions_scale=self._world(),
                          compensate=adapter.lm_head.weight.dtype in (torch.float16, torch.bfloat16),
                          group=self.group, documents=st.docs, replayed=replayed)

    def _concat_or_refuse(self, switch: NeedsConcat, docs, gradient_touched: bool) -> None:
        """A chunk showed the model needs attention='concat': switch (attention=None, nothing touched yet)
        or refuse."""
        if not self._auto_attention or gradient_touched:
            raise UnsupportedModelError(
                f"seqwrap.{self.name}: model_type '{self.adapter.model_type}' {switch.reason}; use "
                f"seqwrap.{self.name}(model, attention='concat'), which is exact for it") from None
        self._switch_to_concat(switch.reason, docs)

    def _switch_to_concat(self, reason: str, docs) -> None:
        """attention=None: the first chunk showed that the model needs attention='concat'."""
        blocked = ("offload=True" if self.offload else "Ulysses" if self.group is not None
                   else "packed rows" if docs is not None else None)
        if blocked is not None:
            raise UnsupportedModelError(f"seqwrap.{self.name}: model_type '{self.adapter.model_type}' {reason}; only "
                                        f"attention='concat' is exact for it, and {blocked} needs attention='chunked'")
        warnings.warn(f"seqwrap.{self.name}: model_type '{self.adapter.model_type}' {reason}; this engine uses "
                      "attention='concat' (exact: HF's own attention over the past and fresh K/V) from now on. "
                      "Pass attention='concat' to choose it yourself.", UserWarning, stacklevel=user_stacklevel())
        self.attention = "concat"
        self._auto_attention = False

    def _passes(self, ids, shift, mask, pos, cache, bounds, weights, selected, norm, loss_scale, xfer, objective=None):
        """Pass 1 and pass 2 of one step; returns (summed token losses, float64 0-d; the auxiliary terms
        of the loss that are not divided by the normaliser: coef * router aux loss, or 0.0; None).
        With an objective (engines/objective.py): (0, fn(S), S): pass 1 runs every chunk and sums each
        row's log-probs into S (B,) float64; c = dfn/dS; pass 2 backpropagates c . (the chunk's row sums)."""
        adapter = self.adapter
        cuda_dev = ids.device if ids.device.type == "cuda" else None
        rng = {}
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        last = len(bounds) - 1
        self.offload_stats = {}
        aux = RouterAux(adapter.causal_lm, adapter.decoder, bounds, ids.shape[0], mask, self.name) if self._router_aux else None
        self._backward_ran = False

        def run(i):
            s, e = bounds[i]
            out = adapter.hidden(ids[:, s:e], None if mask is None else mask[:, :e], cache,
                                 None if pos is None else pos[:, s:e], router_logits=aux is not None)
            self._check_updates(cache, i)
            return out if aux is not None else (out, None)

        # pass 1: no grad, in order; keeps K/V; losses of the chunks pass 2 will not recompute
        # (the K/V of chunks after the last recomputed one serve only the loss report). With a router
        # auxiliary loss every chunk runs: its gradient needs the router logits of the whole sequence.
        # With an objective every chunk runs too: c = dfn/dS needs the sums S of the whole rows.
        whole = aux is not None or objective is not None
        rows = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device) if objective is not None else None
        stop = len(bounds) if self.exact_loss or whole else max(selected, default=-1)
        with torch.no_grad():
            for i, (s, e) in enumerate(bounds):
                if i >= stop or (i == last and i in selected and not whole):
                    break  # its K/V serve nobody; pass 2 starts with it
                cache.begin(i, "record", store=i < last)
                with _RNG_LOCK:  # the chunk's draws come in one run from the state recorded for its replay
                    rng[i] = _rng_state(cuda_dev)
                    h, router = run(i)
                if aux is not None:
                    aux.record(i, router)
                if rows is not None:
                    rows += self._logp_rows(h, shift[:, s:e]).double()
                elif i not in selected and self.exact_loss:
                    total += self._loss_sum(h, shift[:, s:e]).double()
                del h, router
        extra = 0.0
        if aux is not None:
            aux.prepare()
            extra = aux.value
        if objective is not None:
            extra, c = seq_objective.weights(objective, rows, self.name)  # fn(S), c = dfn/dS (B,)
        # pass 2: with grad, in reverse, only the selected chunks. A replayed chunk rewinds the generator to
        # its pass-1 state (same dropout masks) and then puts back the state it found, so the generator only
        # ever moves forward for everyone else; _RNG_LOCK keeps other engines' chunks (other threads) out
        # of that window, forward and backward (checkpoint recomputes draw too).
        grad_chunks = set(selected)
        skip = self._param_storages() if xfer is not None else None
        for i in reversed(selected):
            s, e = bounds[i]
            cache.begin(i, "replay", grad_chunks=grad_chunks)
            with _RNG_LOCK:
                found = _rng_state(cuda_dev) if i in rng else None
                if found is not None:
                    _set_rng_state(rng.pop(i), cuda_dev)
                try:
                    with torch.enable_grad(), self._parking(xfer, skip):
                        h, router = run(i)
                        if objective is None:
                            loss_i = self._loss_sum(h, shift[:, s:e])
                        else:  # (B,): the rows' log-prob sums over this chunk
                            loss_i = self._logp_rows(h, shift[:, s:e])
                        aux_i = aux.term(i, router) if aux is not None else None
                    del h, router
                    w = weights[i]
                    roots, grads = [], []
                    if loss_i.requires_grad and objective is not None:  # d fn / d(chunk's row sums) = c
                        roots.append(loss_i)
                        grads.append((c * (w * loss_scale)).to(loss_i.dtype))
                    elif loss_i.requires_grad:
                        roots.append(loss_i)
                        grads.append(torch.tensor(w * loss_scale / norm, dtype=loss_i.dtype, device=loss_i.device))
                    if aux_i is not None:  # coef * aux is not divided by the normaliser
                        roots.append(aux_i)
                        grads.append(torch.tensor(w * loss_scale, dtype=aux_i.dtype, device=aux_i.device))
                    for t, g in cache.relay_pairs(i):
                        roots.append(t)
                        grads.append((g * w).to(t.dtype) if w != 1.0 else g.to(t.dtype))
                    if roots:
                        self._backward_ran = True
                        torch.autograd.backward(roots, grads)
                finally:
                    if found is not None:
                        _set_rng_state(found, cuda_dev)
            cache.flush()
            if objective is None:
                total += loss_i.detach().double() * (1.0 if self.exact_loss else w)
            del loss_i, aux_i, roots, grads
            cache.free(i)
        return total, extra, rows

    # -- helpers -----------------------------------------------------------------
    def _loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of one chunk: hidden (B, L, H), labels (B, L) already shifted."""
        mult, cap = self.adapter.logit_transforms
        hidden = self.adapter.head_input(hidden)
        return chunk_loss_sum(getattr(self.adapter, "loss_head", self.adapter.lm_head), hidden, labels, self.ignore_index, multiplier=mult, softcap=cap)

    def _logp_rows(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,): each row's sum of the log-probs of its counted labels over one chunk (labels already shifted)."""
        mult, cap = self.adapter.logit_transforms
        hidden = self.adapter.head_input(hidden)
        return chunk_logp_rows(getattr(self.adapter, "loss_head", self.adapter.lm_head), hidden, labels,
                               self.ignore_index, multiplier=mult, softcap=cap)

    def _transfers(self, device: torch.device) -> Transfers:
        """One Transfers (side stream) per device, kept across steps."""
        if self._xfer is None or self._xfer.device != device:
            self._xfer = Transfers(device, self.pool)
        return self._xfer

    def _parking(self, xfer, skip):
        if xfer is None:
            return nullcontext()
        return park_activations(xfer, skip, self.offload_min_bytes, self.offload_stats)

    def _param_storages(self) -> set[int]:
        """Storages of the model's parameters and buffers (never parked on the host)."""
        lm = self.adapter.causal_lm
        return {t.untyped_storage().data_ptr() for t in list(lm.parameters()) + list(lm.buffers())}

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.adapter.causal_lm.parameters() if p.requires_grad]

    def _world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    def _group_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the Ulysses group (identity without one)."""
        if self.group is None:
            return t
        t = t.to(torch.float64).clone()
        dist.all_reduce(t, group=self.group)
        return t

    def _same_on_all_ranks(self, weights: list[float]) -> list[float]:
        """Under Ulysses every rank must run the same chunks: rank 0's draw is used."""
        if self.group is None:
            return weights
        t = torch.tensor(weights, dtype=torch.float64)
        dist.broadcast(t, group=self.group, group_src=0)
        return t.tolist()

def _sum(S: torch.Tensor) -> torch.Tensor:
    """The objective of sequence_logps(): only S is wanted."""
    return S.sum()


def _no_single_token_tail(bounds):
    """Merges a last chunk of one token into the chunk before it (HF's recurrent mixers run a single
    token through an in-place state update that a chunked step cannot replay)."""
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        return bounds[:-2] + [(bounds[-2][0], bounds[-1][1])]
    return bounds


# torch's CPU generator (and each device's CUDA generator) is process-wide: two engines stepping in two
# threads would rewind it under each other. Every chunk forward (and replayed backward) of every seqwrap
# engine runs under this lock, so a chunk's draws come from the state recorded for it.
_RNG_LOCK = threading.RLock()


def _rng_state(cuda_dev):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(cuda_dev)) if cuda_dev is not None else (cpu, None)


def _set_rng_state(state, cuda_dev):
    torch.set_rng_state(state[0])
    if cuda_dev is not None and state[1] is not None:
        torch.cuda.set_rng_state(state[1], cuda_dev)
