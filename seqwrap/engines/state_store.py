"""The chunked engines' store of recurrent-layer boundary states, with the relay of their adjoints.

Recurrent layers (Mamba / Mamba-2 mixers, gated linear attention) carry a state from token to
token: a conv state (the last inputs of a causal depthwise conv, (B, channels, width)) and an
SSM / recurrent state (e.g. (B, heads, headdim, dstate)). A layer may keep several of each
(`idx`). The model reaches this store through the HF boundary (seqwrap/hf/hybrid_cache.py), whose
cache hands every state read and write of the model here:

  pass 1 (record, no grad), chunk i: `entry(i)` hands out the state entering chunk i (None for
      chunk 0: the model starts from zeros); the states the model writes at the end of chunk i
      are kept as the entry states of chunk i+1.
  pass 2 (replay, with grad), chunk i: the entry states of chunk i come back as leaves that
      require grad (when chunk i-1 is recomputed too); the end states the model writes are kept
      with their graph. `relay_pairs(i)` pairs them with the adjoint that chunk i+1's backward
      left on its entry leaves, so one backward of chunk i takes its own loss, the K/V gradients
      and d(loss of later chunks)/d(state after chunk i); `finish(i)` then keeps the gradient of
      chunk i's entry leaves as the adjoint for chunk i-1.

A conv state update takes the new conv inputs (B, channels, L) and returns [state ; new] for the
model's conv (so the first outputs of the chunk see the previous chunk's last inputs, never zero
padding); the new state is the last `width` columns (left zero-padded while fewer exist).

States and adjoints are small (per layer and chunk boundary: one conv and one SSM state) and stay
on the model's device.
"""
from __future__ import annotations

import torch

Key = tuple  # (layer, kind, idx), kind "conv" or "ssm"


class ChunkStateStore:
    """Boundary states of the recurrent layers `layers` for the chunks of one step."""

    def __init__(self, layers):
        self.layers = frozenset(layers)
        self.entries: dict[int, dict[Key, torch.Tensor]] = {}    # chunk -> key -> state entering it (detached)
        self.adjoints: dict[int, dict[Key, torch.Tensor]] = {}   # chunk -> key -> dL/d(state entering it)
        self.leaves: dict[Key, torch.Tensor] = {}                # replay: entry leaves handed out
        self.fresh: dict[Key, torch.Tensor] = {}                 # replay: end states with their graph
        self.used: set[int] = set()                              # layers that wrote a state this chunk
        self.chunk, self.mode, self.store, self.grad_chunks = 0, "record", True, frozenset()

    # -- engine side ---------------------------------------------------------------
    def begin(self, chunk: int, mode: str, store: bool = True, grad_chunks=()) -> None:
        self.chunk, self.mode, self.store = chunk, mode, store
        self.grad_chunks = frozenset(grad_chunks)
        self.leaves, self.fresh, self.used = {}, {}, set()

    def relay_pairs(self, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(end state of the replayed chunk with its graph, adjoint relayed by chunk+1)."""
        pairs = []
        for key, adj in self.adjoints.pop(chunk + 1, {}).items():
            t = self.fresh.get(key)
            if t is None:
                raise RuntimeError(f"seqwrap: layer {key[0]} received an adjoint for its {key[1]} state after chunk "
                                   f"{chunk}, but chunk {chunk}'s recompute did not write that state")
            if t.requires_grad:
                pairs.append((t, adj))
        return pairs

    def finish(self, chunk: int) -> None:
        """After chunk `chunk`'s backward: its entry leaves' gradients become the adjoint for chunk-1."""
        if self.mode == "replay" and chunk - 1 in self.grad_chunks:
            self.adjoints[chunk] = {k: (t.grad if t.grad is not None else torch.zeros_like(t))
                                    for k, t in self.leaves.items() if t.requires_grad}
        self.entries.pop(chunk, None)
        self.leaves, self.fresh = {}, {}

    def release_all(self) -> None:
        self.entries, self.adjoints, self.leaves, self.fresh = {}, {}, {}, {}

    def missing(self) -> list[int]:
        """Recurrent layers that wrote no state in the current chunk."""
        return sorted(self.layers - self.used)

    # -- model side (through the HF cache view) ----------------------------------------
    def entry(self, layer: int, kind: str, idx: int = 0) -> torch.Tensor | None:
        """The `kind` state `idx` of `layer` entering the current chunk (None: zeros, chunk 0).
        In replay, a leaf (the same one on every call of the chunk: gradient checkpointing recomputes)."""
        key = (layer, kind, idx)
        if self.mode == "replay":
            leaf = self.leaves.get(key)
            if leaf is None:
                t = self.entries.get(self.chunk, {}).get(key)
                if t is None:
                    return None
                leaf = t.detach().requires_grad_(self.chunk - 1 in self.grad_chunks)
                self.leaves[key] = leaf
            return leaf
        return self.entries.get(self.chunk, {}).get(key)

    def update_conv(self, layer: int, new: torch.Tensor, width: int, idx: int = 0) -> torch.Tensor:
        """new: (B, channels, L) conv inputs of the chunk. Returns [entry state ; new] (B, channels, w + L)
        (just `new` in chunk 0) and keeps the last `width` columns as the state after the chunk."""
        prev = self.entry(layer, "conv", idx)
        full = new if prev is None else torch.cat([prev.to(new.dtype), new], dim=-1)
        end = full[..., -width:] if full.shape[-1] >= width else \
            torch.nn.functional.pad(full, (width - full.shape[-1], 0))
        self._write(layer, "conv", idx, end)
        return full

    def update_ssm(self, layer: int, state: torch.Tensor, idx: int = 0) -> torch.Tensor:
        """state: the layer's recurrent state after the chunk."""
        self._write(layer, "ssm", idx, state)
        return state

    def _write(self, layer: int, kind: str, idx: int, t: torch.Tensor) -> None:
        key = (layer, kind, idx)
        self.used.add(layer)
        if self.mode == "record":
            if self.store:
                # a copy: t is often a view of the chunk's whole conv input or of every chunk state
                self.entries.setdefault(self.chunk + 1, {})[key] = t.detach().clone()
        elif key not in self.fresh:  # a second write is a gradient-checkpointing recompute
            self.fresh[key] = t
