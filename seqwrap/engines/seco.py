"""SeCO: exact chunk-wise training of Hugging Face causal LMs (Li et al. 2025).

    engine = seqwrap.SeCO(model, chunk_size=2048)
    out = engine(input_ids, labels=labels, attention_mask=mask)   # forward + backward
    optimizer.step()

Pass 1 (no grad) runs the chunks in order and keeps each layer's K/V per chunk
(ChunkKVCache). Pass 2 runs the chunks in reverse: chunk i is recomputed with
grad, attending to the stored K/V of earlier chunks plus its own fresh K/V;
one backward takes its loss and the gradient already relayed onto its K/V by
later chunks, and relays gradient onto the K/V of earlier chunks. Chunk i's
K/V and relayed gradients are freed when it is done. At most one chunk's
activations and logits are alive at a time.

SpaCO (spaco.py) is this engine with a chunk sampler: it overrides
`chunk_weights`, the factor of each chunk's backward (0 = not recomputed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.hf import HFDecoderAdapter, UnsupportedModelError, unwrap_ddp
from .chunk_loss import chunk_loss_sum
from .distributed import sync_gradients
from .kv_cache import ChunkKVCache


@dataclass
class StepResult:
    """What one engine call did.

    loss:      detached, the step's loss as HF computes it (sum of token losses / normaliser)
    num_tokens: input tokens processed (non-padding tokens when attention_mask is given)
    num_items: the normaliser (non-ignored labels of the step, or `num_items` when given)
    num_chunks: chunks the sequence was split into
    backward_chunks: chunks recomputed with grad (SeCO: all of them)
    """

    loss: torch.Tensor
    num_tokens: int
    num_items: float
    num_chunks: int
    backward_chunks: int


class SeCO:
    """Exact chunk-wise forward + backward for a HF decoder-only causal LM.

    model: a *ForCausalLM (or a peft PeftModel of one, or a DDP wrapper of either).
    chunk_size: tokens per chunk (> 0); the last chunk may be shorter.
    options: ignore_index (default -100).
    """

    name = "SeCO"
    exact_loss = True  # SpaCO(exact_loss=False) reports the unbiased estimate instead

    def __init__(self, model: nn.Module, chunk_size: int = 2048, *, ignore_index: int = -100, **options):
        if options:
            raise TypeError(f"seqwrap.{self.name}: unknown option(s) {sorted(options)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"seqwrap.{self.name}: chunk_size must be an int, not {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"seqwrap.{self.name}: chunk_size must be > 0, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.adapter = HFDecoderAdapter.from_model(model, self.name)
        self._ddp = unwrap_ddp(model)[1]
        self.step = 0

    # -- what SpaCO overrides ------------------------------------------------
    def chunk_weights(self, label_counts: list[int]) -> list[float]:
        """Factor on each chunk's backward (own loss + relayed gradient); 0 skips the chunk."""
        return [1.0] * len(label_counts)

    # -- one step --------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, num_items=None,
                 loss_scale: float = 1.0) -> StepResult:
        """Forward and backward of the whole sequence; parameter .grad accumulates as
        `model(input_ids, labels=labels, attention_mask=attention_mask).loss.backward()` would.

        input_ids, labels, attention_mask: (B, T) (or (T,)); labels=None means labels=input_ids.
        num_items: normaliser of the summed token losses (HF's num_items_in_batch); default the
                   number of non-ignored labels of the step.
        loss_scale: extra factor on the gradients (not on the returned loss), e.g. 1/accumulation.
        """
        ids, labels, mask = self._check_inputs(input_ids, labels, attention_mask)
        B, T = ids.shape
        shift = F.pad(labels[:, 1:], (0, 1), value=self.ignore_index)  # shift[b, t]: target of position t
        valid = shift != self.ignore_index
        if num_items is None:
            norm = float(valid.sum())
        else:
            norm = float(num_items.item() if torch.is_tensor(num_items) else num_items)
            if not norm > 0:
                raise ValueError(f"seqwrap.{self.name}: num_items must be > 0, got {num_items}")
        norm = norm or 1.0  # no label at all: loss 0, no gradient (HF would give nan)
        C = self.chunk_size
        bounds = [(s, min(s + C, T)) for s in range(0, T, C)]
        counts = [int(valid[:, s:e].sum()) for s, e in bounds]
        weights = [float(w) for w in self.chunk_weights(counts)]
        selected = [i for i, w in enumerate(weights) if w != 0.0]
        self.step += 1

        adapter = self.adapter
        cache = ChunkKVCache(bounds, [k == "sliding_attention" for k in adapter.layer_kinds], adapter.sliding_window)
        cuda_dev = ids.device if ids.device.type == "cuda" else None
        rng = {}
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        last = len(bounds) - 1
        ckpt = _CheckpointWithCache(adapter, self.name)
        with ckpt:
            # pass 1: no grad, in order; keeps K/V; losses of the chunks pass 2 will not recompute
            # (the K/V of chunks after the last recomputed one serve only the loss report)
            stop = len(bounds) if self.exact_loss else max(selected, default=-1)
            with torch.no_grad():
                for i, (s, e) in enumerate(bounds):
                    if i >= stop or (i == last and i in selected):
                        break  # its K/V serve nobody; pass 2 starts with it
                    rng[i] = _rng_state(cuda_dev)
                    cache.begin(i, "record", store=i < last)
                    h = adapter.hidden(ids[:, s:e], None if mask is None else mask[:, :e], cache)
                    self._check_updates(cache, i)
                    if i not in selected and self.exact_loss:
                        total += chunk_loss_sum(adapter.causal_lm, adapter.lm_head, h, shift[:, s:e],
                                                self.ignore_index).double()
                    del h
            # pass 2: with grad, in reverse, only the selected chunks
            grad_chunks = set(selected)
            for i in reversed(selected):
                s, e = bounds[i]
                if i in rng:  # same dropout masks as in pass 1
                    _set_rng_state(rng.pop(i), cuda_dev)
                cache.begin(i, "replay", grad_chunks=grad_chunks)
                with torch.enable_grad():
                    h = adapter.hidden(ids[:, s:e], None if mask is None else mask[:, :e], cache)
                    self._check_updates(cache, i)
                    loss_i = chunk_loss_sum(adapter.causal_lm, adapter.lm_head, h, shift[:, s:e], self.ignore_index)
                del h
                w = weights[i]
                roots, grads = [], []
                if loss_i.requires_grad:
                    roots.append(loss_i)
                    grads.append(torch.tensor(w * loss_scale / norm, dtype=loss_i.dtype, device=loss_i.device))
                for t, g in cache.relay_pairs(i):
                    roots.append(t)
                    grads.append((g * w).to(t.dtype) if w != 1.0 else g.to(t.dtype))
                if roots:
                    torch.autograd.backward(roots, grads)
                total += loss_i.detach().double() * (1.0 if self.exact_loss else w)
                del loss_i, roots, grads
                cache.free(i)
        if self._ddp is not None:
            sync_gradients(self._ddp)
        num_tokens = int(mask.sum()) if mask is not None else B * T
        loss_dtype = torch.float64 if adapter.lm_head.weight.dtype == torch.float64 else torch.float32
        return StepResult((total / norm).to(loss_dtype), num_tokens, norm, len(bounds), len(selected))

    # -- checks ----------------------------------------------------------------
    def _check_inputs(self, input_ids, labels, attention_mask):
        name = self.name
        if not torch.is_tensor(input_ids):
            raise TypeError(f"seqwrap.{name}: input_ids must be a tensor, not {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"seqwrap.{name}: input_ids must hold integer token ids, not {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            labels = labels.unsqueeze(0) if torch.is_tensor(labels) and labels.dim() == 1 else labels
            if torch.is_tensor(attention_mask) and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"seqwrap.{name}: input_ids must be (batch, seq_len) and non-empty, "
                             f"got shape {tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids
        if not torch.is_tensor(labels) or labels.shape != input_ids.shape:
            got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"seqwrap.{name}: labels shape {got} does not match input_ids shape "
                             f"{tuple(input_ids.shape)} (labels are aligned with input_ids and shifted inside)")
        if attention_mask is not None and (not torch.is_tensor(attention_mask)
                                           or attention_mask.shape != input_ids.shape):
            got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(f"seqwrap.{name}: attention_mask shape {got} does not match input_ids shape "
                             f"{tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        limit = self.adapter.max_positions
        if limit is not None and T > limit:
            raise ValueError(f"seqwrap.{name}: input of {T} tokens is longer than the model's limit "
                             f"(max_position_embeddings={limit} for model_type '{self.adapter.model_type}')")
        device = self.adapter.lm_head.weight.device
        input_ids = input_ids.to(device)
        labels = labels.to(device=device, dtype=torch.long)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: same result, and the causal fast path
        return input_ids, labels, attention_mask

    def _check_updates(self, cache: ChunkKVCache, chunk: int) -> None:
        n = len(cache.updated)
        if n != self.adapter.num_layers:
            raise UnsupportedModelError(
                f"seqwrap.{self.name} does not support model_type '{self.adapter.model_type}': only {n} of its "
                f"{self.adapter.num_layers} layers passed their keys/values through the HF Cache API "
                f"(past_key_values.update) in chunk {chunk}"
            )


class _CheckpointWithCache:
    """Lets HF gradient checkpointing keep our cache inside decoder layers for the call.

    HF drops past_key_values in checkpointed layers unless `_can_checkpoint_with_cache`;
    our cache tolerates the recompute (a second update of a layer in the same chunk).
    Reentrant checkpointing hides the fresh K/V from autograd, so it is refused.
    """

    def __init__(self, adapter: HFDecoderAdapter, name: str):
        self.layers = [m for m in adapter.decoder_layers() if getattr(m, "gradient_checkpointing", False)]
        for m in self.layers:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", False):
                raise ValueError(
                    f"seqwrap.{name}: reentrant gradient checkpointing is not supported; enable it with "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
                )

    def __enter__(self):
        for m in self.layers:
            m._can_checkpoint_with_cache = True
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        return False


def _rng_state(cuda_dev):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(cuda_dev)) if cuda_dev is not None else (cpu, None)


def _set_rng_state(state, cuda_dev):
    torch.set_rng_state(state[0])
    if cuda_dev is not None and state[1] is not None:
        torch.cuda.set_rng_state(state[1], cuda_dev)
