"""Training engines: orchestrate chunked forward/backward passes with torch autograd.

SeCO / SpaCO (HF decoder LMs) and AdjointSharding (HF Mamba). They reach models only through the
adapters of seqwrap/hf/ (imported with them, on first use), so the engine building blocks
(kv_store, seco_attention, offload, chunk_loss) import without transformers."""
import importlib

_EXPORTS = {"AdjointOutput": "adjoint", "AdjointSharding": "adjoint", "SeCO": "seco", "StepResult": "seco",
            "SpaCO": "spaco", "proportional_to_labels": "spaco"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'seqwrap.engines' has no attribute {name!r}")
