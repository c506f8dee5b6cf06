"""The HF Cache view of a hybrid model's chunked step: ChunkCache (attention K/V) plus the
linear-attention state API that HF's recurrent mixers call, answered by the engine's
ChunkStateStore (seqwrap/engines/state_store.py).

What HF's mixers (Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2, Qwen3-Next; transformers
5.15-5.25) call on their cache, per layer and forward:
  >= 5.2x: get_conv_state(layer, state_idx), get_recurrent_state(layer, state_idx) (None: no
           previous state), is_recording_past(layer)
  5.15:    has_previous_state(layer), then layers[layer].conv_states[0] / .recurrent_states[0]
           and layers[layer].record_past
  both:    update_conv_state(new_inputs (B, C, L), layer, conv_kernel_size=k) -> the conv input the
           mixer convolves ([previous state ; new]; it keeps the last L outputs), and
           update_recurrent_state(final_state, layer) after the scan.
  >= 5.25: get_recurrent_states_to_keep(layer) (intermediate states for speculative decoding: 0 here)
           before the chunked scan, increase_count(layer, state_idx) on the single-token path.
The single-token paths (L == 1 with a previous state) update the cached tensors in place; the
engines never run 1-token chunks on hybrid models (seqwrap.engines.seco merges such a tail).
"""
from __future__ import annotations

from .cache import ChunkCache, _ChunkLayer


class _StateView(dict):
    """layers[i].conv_states / .recurrent_states of transformers 5.15: {state_idx: tensor}, read lazily."""

    def __init__(self, states, layer, kind):
        super().__init__()
        self._states, self._layer, self._kind = states, layer, kind

    def __getitem__(self, idx):
        return self._states.entry(self._layer, self._kind, idx)


class _RecurrentLayer(_ChunkLayer):
    """Placeholder of a recurrent (or hybrid) layer; its states live in the engine's ChunkStateStore."""

    record_past = False

    def __init__(self, sliding, states, layer):
        super().__init__(sliding)
        self.conv_states = _StateView(states, layer, "conv")
        self.recurrent_states = _StateView(states, layer, "ssm")


class HybridChunkCache(ChunkCache):
    """ChunkCache over a HybridChunkStore `store` (store.states: the ChunkStateStore)."""

    def __init__(self, store):
        super().__init__(store)
        states = store.states
        self.states = states
        self.layers = [_RecurrentLayer(s, states, i) if i in states.layers else layer
                       for i, (s, layer) in enumerate(zip(store.sliding, self.layers))]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self.states.entry(layer_idx, "conv", state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self.states.entry(layer_idx, "ssm", state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            raise RuntimeError("seqwrap: has_previous_state() without a layer index is not supported in a chunked "
                               "step")
        idx = 0 if state_idx is None else state_idx
        return (self.states.entry(layer_idx, "conv", idx) is not None
                or self.states.entry(layer_idx, "ssm", idx) is not None)

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        """transformers >= 5.25: how many intermediate recurrent states the chunked scan should return (for
        speculative decoding). A chunked step needs only each chunk's final state: none."""
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0):
        """transformers >= 5.25 calls this only on its single-token path, which updates the conv state in place; the
        engines never run one-token chunks on recurrent models (see the module docstring), so reaching it is a bug
        that would make the step inexact: refuse loudly."""
        raise RuntimeError(f"seqwrap: layer {layer_idx} took HF's single-token in-place state update inside a chunked "
                           "step; the engines merge one-token tails, so this model's mixer is not supported")

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, conv_kernel_size=None, **kwargs):
        if conv_kernel_size is None:
            raise RuntimeError(f"seqwrap: layer {layer_idx} updated its conv state without conv_kernel_size; this "
                               "mixer's cache use is not supported by the chunked engines")
        return self.states.update_conv(layer_idx, conv_states, int(conv_kernel_size), state_idx)

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self.states.update_ssm(layer_idx, recurrent_states, state_idx)


def recurrent_state(cache, layer: int):
    """The SSM state a mixer continues from (None: no previous state), from seqwrap's view or from HF's
    own cache in either API form (get_recurrent_state >= 5.23; has_previous_state + layers[i]
    .recurrent_states before)."""
    get = getattr(cache, "get_recurrent_state", None)
    if get is not None:
        return get(layer, state_idx=0)
    if not cache.has_previous_state(layer):
        return None
    return cache.layers[layer].recurrent_states[0]
