"""The HF Cache the model sees during a chunked step: a thin view of the engine's ChunkKVStore.

transformers calls `update(k, v, layer_idx, ...)` once per attention layer after RoPE (k, v:
(B, heads_kv, L, head_dim) of the current chunk) and asks the cache for sequence length, query
offset and mask sizes while building masks. All state lives in the engine's ChunkKVStore
(seqwrap/engines/kv_store.py); this class only translates the Cache API to it.
"""
from __future__ import annotations

from transformers.cache_utils import Cache, CacheLayerMixin


class _ChunkLayer(CacheLayerMixin):
    """Placeholder layer: lets HF's Cache helpers (is_sliding, is_linear...) see one layer per decoder
    layer. The state lives in the store."""

    is_compileable = False

    def __init__(self, sliding: bool):
        super().__init__()
        self.is_sliding = sliding

    def lazy_initialization(self, key_states, value_states):  # pragma: no cover - never called
        raise RuntimeError("seqwrap's chunk cache layers are updated through the cache")

    def update(self, *args, **kwargs):  # pragma: no cover - ChunkCache.update handles it
        raise RuntimeError("seqwrap's chunk cache layers are updated through the cache")

    def get_mask_sizes(self, *args, **kwargs):  # pragma: no cover
        raise RuntimeError("seqwrap's chunk cache answers mask sizes itself")

    def get_seq_length(self):  # pragma: no cover
        raise RuntimeError("seqwrap's chunk cache answers the sequence length itself")

    def get_max_length(self):
        return -1


class ChunkCache(Cache):
    """Cache API over `store` (a ChunkKVStore)."""

    def __init__(self, store):
        super().__init__(layers=[_ChunkLayer(s) for s in store.sliding])
        self.store = store

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.store.update(key_states, value_states, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.store.query_offset

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.store.query_offset

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.store.mask_sizes(query_length, layer_idx)

    def get_max_length(self, layer_idx=None) -> int:
        return -1
