"""The chunked engines' per-chunk K/V store, which also relays the K/V gradients.

The model reaches it through the HF boundary (seqwrap/hf/cache.py): every HF
decoder LM calls its cache's `update(k, v, layer_idx)` once per layer, after
RoPE, with k and v of shape (B, heads_kv, L, head_dim) for the L tokens of the
current chunk, and the attention uses what update returns; the HF cache hands
that call to `ChunkKVStore.update`. The store runs in one of two attention modes:

  "chunked" (the engines' default): update hands back the fresh k, v as they
      are; the engines' attention (seco_attention.py) calls `record`
      (pass 1: keep k, v of chunk i; pass 2: remember the fresh k, v) and reads
      the past through `past_blocks`, one chunk at a time (prefetched from the
      host with offload); its backward adds dL/d(past chunk j) into the
      RelaySinks of chunk j.
  "concat": in record mode (pass 1, no grad) keep k, v of chunk i and return
      [past chunks ; k]; in replay (pass 2, with grad) return [past ; fresh k]
      through _CatWithPast, whose backward sends dL/d(past chunk j) into a
      RelaySink of chunk j, and remember the fresh k, v.

Relay sums of bfloat16 K/V are kept in bfloat16 (the K/V dtype: the engine rounds
each sum to the K/V dtype anyway before its backward), Kahan-compensated by a second
bfloat16 buffer only for the chunks that receive more than RELAY_PLAIN_MAX_ADDS
additions (see RelaySink); other relay sums are float32 (float64 for float64 models),
Kahan-compensated for float16 models; the engine adds chunk i's relayed gradient to its fresh
K/V in chunk i's backward (relay_pairs). Sliding-window layers (Gemma2,
Mistral with a window) only see the past chunks that overlap the window; the
mask sizes they report say so (kv_offset).
"""
from __future__ import annotations

import math

import torch

from ..ops.attention_blocks import EMPTY
from ..ops.documents import block_mask
from ..ops.dtypes import real_dtype
from ..ops.kahan import kahan_accumulate_
from .offload import HostAccumulator, add_in_kv_dtype_, prefetched

# Relayed K/V gradient sums in bfloat16 (the K/V dtype). Tolerance: the normwise relative error of each
# sum against the float64 sum of the same addends is at most RELAY_TOLERANCE = 4 bfloat16 half-ulps
# (4 * 2^-9); rounding the exact sum to bfloat16 alone costs about 1.7e-3, i.e. 0.85 half-ulps.
# A plain bfloat16 running sum of n random-sign addends errs by about 1.2e-3 * sqrt(n) (measured:
# benchmarks/results/relay_precision.md), within the tolerance up to about 40 additions; a compensated
# one stays at the rounding floor. A sum that adds p plainly and then the rest compensated errs by about
# 1.2e-3 * p / sqrt(n) (the early roundings shrink against the growing sum), so a chunk whose sums get
# n > RELAY_PLAIN_MAX_ADDS additions goes plain for the first relay_plain_adds(n) = isqrt(16 n) of them
# (about 0.7x the error of 32 plain additions: margin for the spread between sums; isqrt(32 n) missed the
# tolerance by 9% on one of 320 random sums) and only then allocates its Kahan buffer: the compensation
# buffers come into existence late in the backward, when most later chunks' K/V and sums are freed.
RELAY_TOLERANCE = 4 * 2.0**-9
RELAY_PLAIN_MAX_ADDS = 32


def relay_plain_adds(adds: int, exact: bool = True) -> int:
    """How many of a bfloat16 relayed sum's `adds` additions are plain before its Kahan compensation starts
    (== adds: never compensated). exact=False (adds is only an upper bound: sampled chunks, documents,
    padding, sliding windows): RELAY_PLAIN_MAX_ADDS, safe for any smaller count that actually arrives."""
    if adds <= RELAY_PLAIN_MAX_ADDS:
        return adds
    return math.isqrt(RELAY_PLAIN_MAX_ADDS * adds // 2) if exact else RELAY_PLAIN_MAX_ADDS


class RelaySink:
    """Accumulates dL/dK (or dL/dV) of one chunk and one layer, shape (B, heads_kv, L, head_dim).

    kv_dtype=torch.bfloat16 (the stored K/V's dtype): the sum is bfloat16, each addition done in
    float32 and rounded once; with adds > RELAY_PLAIN_MAX_ADDS (the number of additions it will get)
    a second bfloat16 buffer compensates it (Kahan) from addition plain + 1 on (plain =
    relay_plain_adds(adds, exact), given by the store; allocated only then). Otherwise float64 models accumulate in float64,
    everything else in float32; float16 gradients (or every gradient, with compensate=True: a
    half-precision model whose block gradients arrive in float32) go through the core's
    compensated (Kahan) accumulation.
    host: a HostAccumulator when the sums live in host memory (offload), else None.
    """

    __slots__ = ("acc", "comp", "compensate", "host", "kv_dtype", "adds", "plain", "done")

    def __init__(self, compensate: bool = False, host=None, kv_dtype: torch.dtype | None = None, adds: int = 0,
                 plain: int | None = None):
        self.acc = None
        self.comp = None
        self.compensate = compensate
        self.host = host
        self.kv_dtype = kv_dtype
        self.adds = adds
        self.plain = relay_plain_adds(adds, exact=False) if plain is None else plain
        self.done = 0  # additions so far

    def add_(self, g: torch.Tensor) -> None:
        if self.kv_dtype == torch.bfloat16:
            self._add_in_kv_dtype(g)
            return
        half = self.compensate or g.dtype in (torch.float16, torch.bfloat16)
        if self.acc is None:
            dtype = real_dtype(g.dtype)
            if self.host is None:
                self.acc = torch.zeros(g.shape, dtype=dtype, device=g.device)
                self.comp = torch.zeros_like(self.acc) if half else None
            else:
                self.acc = self.host.xfer.pool.zeros(g.shape, dtype, "relay")
                self.comp = self.host.xfer.pool.zeros(g.shape, dtype, "relay") if half else None
        if self.host is not None:
            self.host.add(self.acc, self.comp, g)
        elif half:
            kahan_accumulate_([self.acc], [self.comp], [g.detach().contiguous()], 1.0)
        else:
            self.acc.add_(g.detach())

    def _add_in_kv_dtype(self, g: torch.Tensor) -> None:
        if self.acc is None:
            if self.host is None:
                self.acc = torch.zeros(g.shape, dtype=torch.bfloat16, device=g.device)
            else:
                self.acc = self.host.xfer.pool.zeros(g.shape, torch.bfloat16, "relay")
        if self.comp is None and self.done == self.plain < self.adds:  # compensated from here on
            if self.host is None:
                self.comp = torch.zeros_like(self.acc)
            else:
                self.comp = self.host.xfer.pool.zeros(g.shape, torch.bfloat16, "relay")
        self.done += 1
        if self.host is not None:
            self.host.add(self.acc, self.comp, g)
        else:
            add_in_kv_dtype_(self.acc, self.comp, g)

    def release(self) -> None:
        """Hands host buffers back to the pool (device sums are simply dropped)."""
        if self.host is not None:
            for t in (self.acc, self.comp):
                if t is not None:
                    self.host.xfer.release(t)
        self.acc = self.comp = None


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


class ChunkKVStore:
    """Per-layer, per-chunk K/V store driven by a chunked engine (see module docstring).

    bounds: [(start, end)] of each chunk along the (local) sequence
    sliding: per layer, whether it is a sliding-window layer; window: its size
    attention: "concat" (update returns [past ; fresh]) or "chunked" (update returns fresh only;
        the engine's attention function calls `attend`, which reads the past block by block)
    key_padding: (B, T) bool, the padding mask of the keys ("chunked"; None: no padding)
    offload: a Transfers object: past K/V and their relayed gradients live in host buffers
    positions_scale: chunk positions as attention sees them are bounds * positions_scale
        (Ulysses: each rank holds 1/P of every chunk, attention sees whole chunks)
    compensate: Kahan-compensated relay sums (half-precision models)
    group: the Ulysses process group when the model is sequence-parallel, else None
    documents: the document layout of a packed batch over attention positions (ops/documents.py),
        or None: queries only see keys of their own document, past chunks without such keys are
        not read, and a chunk whose documents end inside it is not stored ("chunked" only)
    replayed: the chunks pass 2 replays (SpaCO: the sampled ones), None: all; only they relay gradients,
        so they are what relay_adds counts
    """

    def __init__(self, bounds: list[tuple[int, int]], sliding: list[bool], window: int | None, *,
                 attention: str = "concat", key_padding: torch.Tensor | None = None, offload=None,
                 positions_scale: int = 1, compensate: bool = False, group=None, documents=None,
                 replayed=None):
        if attention not in ("concat", "chunked"):
            raise ValueError(f"attention must be 'concat' or 'chunked', got {attention!r}")
        if documents is not None and attention != "chunked":
            raise ValueError("document boundaries need attention='chunked'")
        if offload is not None and attention != "chunked":
            raise ValueError("offload needs attention='chunked'")
        self.bounds = bounds
        self.attn_bounds = [(s * positions_scale, e * positions_scale) for s, e in bounds]
        self.sliding = sliding
        self.window = window
        self.attention = attention
        self.key_padding = key_padding
        # chunks without any padded key need no padding mask (decided once, not per block)
        self.padded_chunks = set() if key_padding is None else {
            j for j, (s, e) in enumerate(bounds) if not bool(key_padding[:, s:e].all())}
        self.xfer = offload
        self.host_sums = HostAccumulator(offload) if offload is not None else None
        self.compensate = compensate
        self.group = group  # Ulysses process group (the attention all-to-alls around the blocks), or None
        self.documents = documents
        self.replayed = None if replayed is None else frozenset(replayed)
        n = len(sliding)
        self.keys: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]    # layer -> chunk -> (B,H,L,D)
        self.values: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
        self.sinks: dict[int, list[tuple[RelaySink, RelaySink]]] = {}        # chunk -> per layer (dK, dV)
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}         # layer -> (k, v) of the replayed chunk
        self.chunk = 0
        self.mode = "record"
        self.store = True
        self.grad_chunks: set[int] = set()
        self.updated: set[int] = set()    # layers that called update() in the current chunk
        self.attended: set[int] = set()   # layers whose attention went through attend()
        # calls per layer in the current chunk's forward (the engine checks each is 1 right after the
        # forward; a gradient-checkpointing recompute during the backward adds more, unchecked)
        self.update_calls: dict[int, int] = {}
        self.attend_calls: dict[int, int] = {}

    # -- engine side -------------------------------------------------------
    def begin(self, chunk: int, mode: str, store: bool = True, grad_chunks=()) -> None:
        """Start chunk `chunk` in mode 'record' (store=False: do not keep its K/V) or 'replay'.
        In replay, past chunks in grad_chunks receive relayed gradients."""
        self.chunk, self.mode, self.store = chunk, mode, store
        self.grad_chunks = set(grad_chunks)
        self.fresh = {}
        self.updated = set()
        self.attended = set()
        self.update_calls = {}
        self.attend_calls = {}
        if mode == "replay":  # its own stored K/V are recomputed fresh: drop them now
            self._drop_kv(chunk)

    def relay_pairs(self, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fresh K or V of the replayed chunk, gradient relayed to it by later chunks), float32/64,
        on the device of the fresh tensor."""
        sinks = self.sinks.get(chunk)
        pairs = []
        if sinks is None:
            return pairs
        self.flush()
        for layer, (k, v) in self.fresh.items():
            for t, sink in zip((k, v), sinks[layer]):
                if sink.acc is not None and t.requires_grad:
                    acc = sink.acc
                    if self.xfer is not None:
                        acc = self.xfer.finish(*self.xfer.start_to_device(acc))
                    pairs.append((t, acc))
        return pairs

    def flush(self) -> None:
        """Completes pending host-side gradient additions (offload)."""
        if self.host_sums is not None:
            self.host_sums.flush()

    def free(self, chunk: int) -> None:
        """Drops the stored K/V of `chunk` and its relayed gradients."""
        self._drop_kv(chunk)
        for pair in self.sinks.pop(chunk, []):
            for sink in pair:
                sink.release()
        self.fresh = {}

    def release_all(self) -> None:
        """Returns every host buffer still held to the pool (end of a step, or an error)."""
        self.flush()
        for chunk in list(self.sinks):
            self.free(chunk)
        for layer in range(len(self.sliding)):
            for chunk in list(self.keys[layer]):
                self._drop_kv(chunk)
        # the replayed chunk's fresh K/V hold its graph, whose attention nodes hold this store: after a
        # failed step that cycle would keep both alive (and the graph's memory) for good
        self.fresh = {}

    def _drop_kv(self, chunk: int) -> None:
        for layer in range(len(self.sliding)):
            for store in (self.keys[layer], self.values[layer]):
                t = store.pop(chunk, None)
                if t is not None and self.xfer is not None:
                    self.xfer.release(t)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return self.xfer.to_host(t, "kv")[0] if self.xfer is not None else t.detach()

    # -- visibility --------------------------------------------------------
    def _visible(self, layer: int, chunk: int | None = None) -> list[int]:
        """Past chunks that layer `layer` attends to from `chunk` (default: the current chunk)."""
        chunk = self.chunk if chunk is None else chunk
        start = self.attn_bounds[chunk][0]
        if not self.sliding[layer]:
            return list(range(chunk))
        first_key = start - self.window + 1  # a query at `start` sees keys >= start - window + 1
        return [j for j in range(chunk) if self.attn_bounds[j][1] > first_key]

    def relay_adds(self, chunk: int, layer: int) -> int:
        """How many later replayed chunks read `chunk` in `layer` (each adds once into its relayed sums), at
        most (exactly when relay_adds_exact)."""
        later = [i for i in range(chunk + 1, len(self.bounds)) if self.replayed is None or i in self.replayed]
        if not self.sliding[layer]:
            return len(later)
        end = self.attn_bounds[chunk][1]  # chunk i reads it while end > start_i - window + 1
        return sum(1 for i in later if end > self.attn_bounds[i][0] - self.window + 1)

    def relay_adds_exact(self, layer: int) -> bool:
        """Whether every later replayed chunk reads every past chunk of `layer` (no sliding window, no
        documents, no padded keys: no past block is skipped), so relay_adds is the count that arrives."""
        return not self.sliding[layer] and self.documents is None and not self.padded_chunks

    def sink(self, chunk: int, layer: int) -> tuple[RelaySink, RelaySink]:
        per_layer = self.sinks.get(chunk)
        if per_layer is None:
            per_layer = self.sinks[chunk] = [self._sink_pair(chunk, i) for i in range(len(self.sliding))]
        return per_layer[layer]

    def _sink_pair(self, chunk: int, layer: int) -> tuple[RelaySink, RelaySink]:
        kept = self.keys[layer].get(chunk)
        kv_dtype = kept.dtype if kept is not None else None
        adds = self.relay_adds(chunk, layer) if kv_dtype == torch.bfloat16 else 0
        plain = relay_plain_adds(adds, self.relay_adds_exact(layer))
        return (RelaySink(self.compensate, self.host_sums, kv_dtype, adds, plain),
                RelaySink(self.compensate, self.host_sums, kv_dtype, adds, plain))

    # -- chunked attention (called by the engine's attention function) -------
    def layer_window(self, layer: int) -> int | None:
        return self.window if self.sliding[layer] else None

    def mask(self, layer: int, chunk: int, dtype, device):
        """block_mask of the current chunk's queries over chunk `chunk`'s keys for `layer`."""
        q0, q1 = self.attn_bounds[self.chunk]
        k0, k1 = self.attn_bounds[chunk]
        # key_padding is over local positions, which are the attention positions (no Ulysses with padding)
        pad = self.key_padding if chunk in self.padded_chunks else None
        return block_mask(self.documents, q0, q1, k0, k1, causal=True, window=self.layer_window(layer),
                          key_padding=pad, dtype=dtype, device=device)

    def past_blocks(self, layer: int, dtype, device):
        """Yields (chunk, k, v, mask) for the past chunks `layer` attends to, on the device, in
        order; with offload the next chunk's copy is in flight while one is used."""
        items = []
        for j in self._visible(layer):
            mask = self.mask(layer, j, dtype, device)
            if mask is not EMPTY:
                items.append(((j, mask), (self.keys[layer][j], self.values[layer][j]), self.xfer is not None))
        if self.xfer is None:
            for (j, mask), (k, v), _ in items:
                yield j, k, v, mask
            return
        for (j, mask), (k, v) in prefetched(items, self.xfer):
            yield j, k, v, mask

    def record(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pass 1: keeps the current chunk's K/V of `layer` (if this chunk stores)."""
        self._check_layer(layer)
        self.attended.add(layer)
        self.attend_calls[layer] = self.attend_calls.get(layer, 0) + 1
        if self.mode == "record" and self.store and self._read_later():
            self.keys[layer][self.chunk] = self._keep(k)
            self.values[layer][self.chunk] = self._keep(v)
        elif self.mode == "replay" and layer not in self.fresh:  # a second call is a checkpoint recompute
            self.fresh[layer] = (k, v)

    def _read_later(self) -> bool:
        """Whether a later chunk can read the current chunk's keys: always without documents; with them,
        only when a document runs on past the chunk's end."""
        return self.documents is None or self.documents.continues(self.attn_bounds[self.chunk][1])

    # -- what the HF cache (seqwrap/hf/cache.py) hands over -----------------
    def _check_layer(self, layer) -> None:
        """A layer index the store does not know (a model whose attention layers are not the config's layer
        list) is refused, before any gradient, instead of failing on an index."""
        if not isinstance(layer, int) or not 0 <= layer < len(self.sliding):
            from ..hf.compat import UnsupportedModelError

            raise UnsupportedModelError(f"seqwrap: an attention layer with layer_idx {layer!r} ran, but the model's "
                                        f"config lists {len(self.sliding)} layers; its layers cannot be told apart")

    def update(self, key_states, value_states, layer_idx):
        self._check_layer(layer_idx)
        self.update_calls[layer_idx] = self.update_calls.get(layer_idx, 0) + 1
        if self.attention == "chunked":  # the attention function reads the past itself
            self.updated.add(layer_idx)
            return key_states, value_states
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
        sinks = [self.sink(j, layer_idx) if j in self.grad_chunks else (None, None) for j in visible]
        k = _CatWithPast.apply(key_states, [s[0] for s in sinks], *past_k)
        v = _CatWithPast.apply(value_states, [s[1] for s in sinks], *past_v)
        return k, v

    def _offset(self, layer_idx: int) -> int:
        visible = self._visible(layer_idx)
        return self.bounds[visible[0]][0] if visible else self.bounds[self.chunk][0]

    def mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys `layer_idx` sees from the current chunk (concat mode)."""
        layer_idx = min(layer_idx, len(self.sliding) - 1)
        offset = self._offset(layer_idx)
        return self.bounds[self.chunk][0] - offset + query_length, offset

    @property
    def query_offset(self) -> int:
        """Position of the current chunk's first token (local positions)."""
        return self.bounds[self.chunk][0]
