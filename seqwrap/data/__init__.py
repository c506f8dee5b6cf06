"""Data helpers: real text that is on every machine (corpus.py) and packed batches (packing.py).

    from seqwrap.data import pack_documents
    batch = pack_documents(list_of_token_lists, row_len=16384)
    engine(**batch.inputs())          # SeCO / SpaCO / AdjointSharding, or model(**...) under MsT
"""
from .corpus import random_windows, stdlib_bytes, stdlib_documents
from .packing import PackedBatch, pack_documents

__all__ = ["PackedBatch", "pack_documents", "random_windows", "stdlib_bytes", "stdlib_documents"]
