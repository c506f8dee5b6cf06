"""HF gradient checkpointing that keeps the chunk cache inside decoder layers.

transformers' GradientCheckpointingLayer drops the cache argument of a checkpointed layer unless the
layer's `_can_checkpoint_with_cache` is True (5.15+). Our cache tolerates the recompute (a second
update of a layer in the same chunk), so during a step it is set on the instances and removed after.
Reentrant checkpointing hides the fresh K/V from autograd, so it is refused.
"""
from __future__ import annotations


class CheckpointWithCache:
    """Context manager over the decoder layers that have gradient checkpointing on."""

    def __init__(self, layers, name: str):
        self.layers = [m for m in layers if getattr(m, "gradient_checkpointing", False)]
        for m in self.layers:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", False):
                raise ValueError(
                    f"seqwrap.{name}: reentrant gradient checkpointing is not supported; enable it with "
                    "seqwrap.hf.enable_checkpointing(model) (use_reentrant=False), or transformers' "
                    "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})"
                )
            if not hasattr(type(m), "_can_checkpoint_with_cache"):
                raise RuntimeError(
                    f"seqwrap.{name}: {type(m).__name__} has gradient checkpointing on but no "
                    "`_can_checkpoint_with_cache` switch (transformers < 5.15?): the checkpointed layers would "
                    "drop the chunk cache")

    def __enter__(self):
        for m in self.layers:
            m._can_checkpoint_with_cache = True
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("_can_checkpoint_with_cache", None)
        return False
