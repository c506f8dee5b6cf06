"""A Hugging Face Cache that holds K/V per chunk and relays their gradients.

Every HF decoder LM calls `past_key_values.update(k, v, layer_idx)` once per
layer, after RoPE, with k and v of shape (B, heads_kv, L, head_dim) for the
L tokens of the current chunk; the attention then uses what update returns.
This cache has two modes:

  record (pass 1, no grad): keep k, v of chunk i as detached tensors; return
      [past chunks ; k] so the chunk attends to everything before it.
  replay (pass 2, with grad): return [past chunks ; fresh k] through
      _CatWithPast, whose backward sends dL/d(past chunk j) into a RelaySink
      of chunk j (float32, Kahan-compensated for half-precision models), and
      remember the fresh k, v so the engine can add chunk i's own relayed
      gradient to them in its backward.

Sliding-window layers (Gemma2, Mistral with a window) only see the past chunks
that overlap the window; the mask sizes they report say so (kv_offset).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.kahan import kahan_accumulate_


class RelaySink:
    """Accumulates dL/dK (or dL/dV) of one chunk and one layer, shape (B, heads_kv, L, head_dim).

    float64 models accumulate in float64, everything else in float32; float16 /
    bfloat16 gradients go through the core's compensated (Kahan) accumulation.
    """

    __slots__ = ("acc", "comp")

    def __init__(self):
        self.acc = None
        self.comp = None

    def add_(self, g: torch.Tensor) -> None:
        if self.acc is None:
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            self.acc = torch.zeros(g.shape, dtype=dtype, device=g.device)
        if g.dtype in (torch.float16, torch.bfloat16):
            if self.comp is None:
                self.comp = torch.zeros_like(self.acc)
            kahan_accumulate_([self.acc], [self.comp], [g.detach().contiguous()], 1.0)
        else:
            self.acc.add_(g.detach())


class _CatWithPast(torch.autograd.Function):
    """cat([*past, fresh], dim=-2); backward: slices for the past go to their sinks.

    fresh: (B, H, L, D) with grad; past[j]: (B, H, L_j, D) detached; sinks[j]: RelaySink or None
    """

    @staticmethod
    def forward(ctx, fresh, sinks, *past):
        ctx.sinks = sinks
        ctx.lens = [p.shape[-2] for p in past]
        return torch.cat([*past, fresh], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        lens = ctx.lens
        parts = grad.split([*lens, grad.shape[-2] - sum(lens)], dim=-2)
        for sink, part in zip(ctx.sinks, parts[:-1]):
            if sink is not None:
                sink.add_(part)
        return (parts[-1], None, *([None] * len(lens)))


class _ChunkLayer(CacheLayerMixin):
    """Placeholder layer: lets HF's Cache helpers (is_sliding, is_linear...) see one layer per
    decoder layer. The state lives in ChunkKVCache."""

    is_compileable = False

    def __init__(self, sliding: bool):
        super().__init__()
        self.is_sliding = sliding

    def lazy_initialization(self, key_states, value_states):  # pragma: no cover - unused
        pass

    def update(self, *args, **kwargs):  # pragma: no cover - ChunkKVCache.update handles it
        raise RuntimeError("ChunkKVCache layers are updated through the cache")

    def get_mask_sizes(self, query_length):  # pragma: no cover
        raise RuntimeError("ChunkKVCache answers mask sizes itself")

    def get_seq_length(self):  # pragma: no cover
        raise RuntimeError("ChunkKVCache answers the sequence length itself")

    def get_max_length(self):
        return -1


class ChunkKVCache(Cache):
    """Per-layer, per-chunk K/V store driven by a chunked engine (see module docstring).

    bounds: [(start, end)] of each chunk along the sequence
    sliding: per layer, whether it is a sliding-window layer; window: its size
    """

    def __init__(self, bounds: list[tuple[int, int]], sliding: list[bool], window: int | None):
        super().__init__(layers=[_ChunkLayer(s) for s in sliding])
        self.bounds = bounds
        self.sliding = sliding
        self.window = window
        n = len(sliding)
        self.keys: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]    # layer -> chunk -> (B,H,L,D)
        self.values: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
        self.sinks: dict[int, list[tuple[RelaySink, RelaySink]]] = {}        # chunk -> per layer (dK, dV)
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}         # layer -> (k, v) of the replayed chunk
        self.chunk = 0
        self.mode = "record"
        self.store = True
        self.grad_chunks: set[int] = set()
        self.updated: set[int] = set()

    # -- engine side -------------------------------------------------------
    def begin(self, chunk: int, mode: str, store: bool = True, grad_chunks=()) -> None:
        """Start chunk `chunk` in mode 'record' (store=False: do not keep its K/V) or 'replay'.
        In replay, past chunks in grad_chunks receive relayed gradients."""
        self.chunk, self.mode, self.store = chunk, mode, store
        self.grad_chunks = set(grad_chunks)
        self.fresh = {}
        self.updated = set()
        if mode == "replay":  # its own stored K/V are recomputed fresh: drop them now
            for layer in range(len(self.sliding)):
                self.keys[layer].pop(chunk, None)
                self.values[layer].pop(chunk, None)

    def relay_pairs(self, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fresh K or V of the replayed chunk, gradient relayed to it by later chunks), float32/64."""
        sinks = self.sinks.get(chunk)
        pairs = []
        if sinks is None:
            return pairs
        for layer, (k, v) in self.fresh.items():
            for t, sink in zip((k, v), sinks[layer]):
                if sink.acc is not None and t.requires_grad:
                    pairs.append((t, sink.acc))
        return pairs

    def free(self, chunk: int) -> None:
        """Drops the stored K/V of `chunk` and its relayed gradients."""
        for layer in range(len(self.sliding)):
            self.keys[layer].pop(chunk, None)
            self.values[layer].pop(chunk, None)
        self.sinks.pop(chunk, None)
        self.fresh = {}

    # -- visibility --------------------------------------------------------
    def _visible(self, layer: int) -> list[int]:
        """Past chunks that layer `layer` attends to from the current chunk."""
        start = self.bounds[self.chunk][0]
        if not self.sliding[layer]:
            return list(range(self.chunk))
        first_key = start - self.window + 1  # a query at `start` sees keys >= start - window + 1
        return [j for j in range(self.chunk) if self.bounds[j][1] > first_key]

    def _sink(self, chunk: int, layer: int) -> tuple[RelaySink, RelaySink]:
        per_layer = self.sinks.get(chunk)
        if per_layer is None:
            per_layer = self.sinks[chunk] = [(RelaySink(), RelaySink()) for _ in self.sliding]
        return per_layer[layer]

    # -- HF Cache API --------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        visible = self._visible(layer_idx)
        past_k = [self.keys[layer_idx][j] for j in visible]
        past_v = [self.values[layer_idx][j] for j in visible]
        if self.mode == "record":
            if self.store:
                self.keys[layer_idx][self.chunk] = key_states.detach()
                self.values[layer_idx][self.chunk] = value_states.detach()
            self.updated.add(layer_idx)
            if not visible:
                return key_states, value_states
            return torch.cat([*past_k, key_states], dim=-2), torch.cat([*past_v, value_states], dim=-2)
        # replay; a second call for the same layer is a gradient-checkpointing recompute
        if layer_idx not in self.updated:
            self.updated.add(layer_idx)
            self.fresh[layer_idx] = (key_states, value_states)
        if not visible:
            return key_states, value_states
        sinks = [self._sink(j, layer_idx) if j in self.grad_chunks else (None, None) for j in visible]
        k = _CatWithPast.apply(key_states, [s[0] for s in sinks], *past_k)
        v = _CatWithPast.apply(value_states, [s[1] for s in sinks], *past_v)
        return k, v

    def _offset(self, layer_idx: int) -> int:
        visible = self._visible(layer_idx)
        return self.bounds[visible[0]][0] if visible else self.bounds[self.chunk][0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.bounds[self.chunk][0]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.bounds[self.chunk][0]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer_idx = min(layer_idx, len(self.sliding) - 1)
        offset = self._offset(layer_idx)
        return self.bounds[self.chunk][0] - offset + query_length, offset

    def get_max_length(self, layer_idx=None) -> int:
        return -1
