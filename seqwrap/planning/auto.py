"""chunk_size="auto" for SeCO / SpaCO: the chunk size is planned at the first step, when the length is known.

    engine = seqwrap.SeCO(model, chunk_size="auto")             # plan(model, T) at the first call
    engine = seqwrap.SeCO(model, chunk_size=seqwrap.AutoChunk(device_memory="24GB", max_chunk=8192))
    engine.plan                                                  # the Plan it used (None before the first step)

The plan is made once, for the first step's batch and length (device_memory=None: the free memory of
the model's device then); later steps keep that chunk size. Offload and gradient checkpointing stay as
configured (the engine's offload=, the model's HF checkpointing): the plan is made with them fixed,
and when nothing fits that way but would fit with offload and/or checkpointing turned on, the first
step raises a ValueError naming what to pass, before any gradient. What was chosen is announced with
one AutoChunkNotice warning: chunk_size, offload, checkpointing and the predicted peak.
Refused, by name: Ulysses (shard_batch needs the chunk size before the step), FSDP2 (its sharding is
not modelled), offload=True on a CPU model (one memory for device and host).
"""
from __future__ import annotations

import warnings

import torch

from .._warn import user_stacklevel
from .planner import PlanError, plan

_OPTIONS = ("device_memory", "host_memory", "reserve", "min_chunk", "target_chunk", "max_chunk")


class AutoChunkNotice(UserWarning):
    """What chunk_size="auto" chose at the first step (filter it with warnings.simplefilter)."""


class AutoChunk:
    """chunk_size="auto" with planner options: device_memory, host_memory, reserve (bytes or "24GB"),
    min_chunk, target_chunk, max_chunk (tokens); see seqwrap.plan."""

    def __init__(self, **options):
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"seqwrap.AutoChunk: unknown option(s) {unknown}; known: {list(_OPTIONS)}")
        self.options = options

    def __repr__(self) -> str:
        return "AutoChunk(" + ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + ")"

    @property
    def smallest(self) -> int:
        return self.options.get("min_chunk", 256)

    def resolve(self, engine, input_ids: torch.Tensor):
        """The plan for this first step's input (B, T) on `engine`; sets nothing (the engine does)."""
        name = engine.name
        if getattr(engine, "_fsdp", None) is not None:
            raise ValueError(f"seqwrap.{name}: chunk_size='auto' does not model FSDP2's sharded weights and gradients "
                             "yet; pass an explicit chunk_size (seqwrap.plan(model, seq_len) overestimates a sharded "
                             "model's static memory: an upper bound)")
        batch, T = (1, input_ids.shape[0]) if input_ids.dim() == 1 else tuple(input_ids.shape)
        lm = engine.adapter.causal_lm
        device = lm.get_input_embeddings().weight.device
        if engine.offload and device.type == "cpu":
            raise ValueError(f"seqwrap.{name}: chunk_size='auto' with offload=True on a CPU model: device and host are "
                             "one memory there, so the planner cannot size the two; pass an explicit chunk_size")
        ckpt = any(getattr(m, "gradient_checkpointing", False) is True for m in lm.modules())
        common = dict(batch=batch, engine=name, attention=engine.attention, **self.options)
        try:
            return plan(engine.model, T, offload=engine.offload, checkpointing=ckpt, **common)
        except PlanError as exc:
            refused = exc
        try:
            other = plan(engine.model, T, **common)  # offload / checkpointing free
        except PlanError:
            raise PlanError(f"seqwrap.{name}: chunk_size='auto': {refused}") from None
        wants = []
        if other.offload and not engine.offload:
            wants.append(f"seqwrap.{name}(model, chunk_size='auto', offload=True)")
        if other.checkpointing and not ckpt:
            wants.append("seqwrap.hf.enable_checkpointing(model) before the first step")
        if engine.offload and not other.offload:
            wants.append(f"seqwrap.{name}(model, chunk_size='auto', offload=False)")
        if ckpt and not other.checkpointing:
            wants.append("seqwrap.hf.disable_checkpointing(model) before the first step")
        raise PlanError(f"seqwrap.{name}: chunk_size='auto': at {T:,} tokens nothing fits with offload="
                        f"{engine.offload} and gradient checkpointing {'on' if ckpt else 'off'} as configured "
                        f"({refused}); it fits with {other.summary()}: use " + " and ".join(wants))


def announce(engine, p) -> None:
    warnings.warn(f"seqwrap.{engine.name}: chunk_size='auto' chose {p.summary()}", AutoChunkNotice,
                  stacklevel=user_stacklevel())
