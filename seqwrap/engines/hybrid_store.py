"""The store of a chunked step over a hybrid model: K/V of the attention layers (ChunkKVStore) and
boundary states of the recurrent layers (ChunkStateStore), driven by the engine as one object.

The engine calls begin / relay_pairs / free / release_all once per chunk as for attention-only
models; this class forwards each call to both parts, so a chunk's backward takes its loss, the
relayed K/V gradients and the relayed state adjoints in one `torch.autograd.backward`.
"""
from __future__ import annotations

from .kv_store import ChunkKVStore
from .state_store import ChunkStateStore


class HybridChunkStore(ChunkKVStore):
    """ChunkKVStore plus `states`, the ChunkStateStore of the layers listed in `recurrent`."""

    def __init__(self, recurrent, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states = ChunkStateStore(recurrent)

    def begin(self, chunk, mode, store=True, grad_chunks=()):
        super().begin(chunk, mode, store=store, grad_chunks=grad_chunks)
        self.states.begin(chunk, mode, store=store, grad_chunks=grad_chunks)

    def relay_pairs(self, chunk):
        return super().relay_pairs(chunk) + self.states.relay_pairs(chunk)

    def free(self, chunk):
        self.states.finish(chunk)
        super().free(chunk)

    def release_all(self):
        self.states.release_all()
        super().release_all()


def make_store(recurrent, *args, **kwargs) -> ChunkKVStore:
    """A HybridChunkStore when the model has recurrent layers (`recurrent`: their indices), else a
    ChunkKVStore; args and kwargs are ChunkKVStore's."""
    if recurrent:
        return HybridChunkStore(recurrent, *args, **kwargs)
    return ChunkKVStore(*args, **kwargs)
