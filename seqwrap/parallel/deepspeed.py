"""DeepSpeed ZeRO (stages 1, 2, 3) under the chunked engines: gather once, reduce once per step.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, ...)
    seco = seqwrap.SeCO(engine, chunk_size=4096)       # the DeepSpeedEngine itself
    for batch in loader:
        seco(**batch)                                  # forward + backward of the whole sequence
        engine.step()                                  # DeepSpeed's optimizer step, as after engine.backward

A chunked step runs one backward per recomputed chunk and calls the decoder layers directly. Left to
ZeRO's hooks, every backward would reduce(-scatter) the gradients of the parameters it touched (ZeRO-2
and ZeRO-3 reduce per backward), and ZeRO-3 would all-gather every layer at each use (pass-1 forward,
pass-2 forward and backward of every chunk) and release it after. DeepSpeedStep drives the step instead:

  * DeepSpeed's public `engine.coalesce_grad_reduction()` holds the step: the chunk backwards leave
    their gradients on the parameters (full size, accumulated), and when the step ends DeepSpeed runs
    one reduction pass over them (its own buckets, averaging over the data-parallel group, partitioned
    fp32 gradients where ZeRO-2/3 keep them), exactly what engine.step() then reads.
  * ZeRO-3: every parameter of the model is all-gathered once when the step begins
    (deepspeed.zero.GatheredParameters: one coalesced all-gather) and re-partitioned when it ends; while
    the step runs, ZeRO-3's module hooks are told the parameters are in use (a marker in each
    parameter's ds_active_sub_modules, the set ZeRO-3 itself uses to keep a parameter that a running
    module needs), so they neither release nor re-gather them. Costs the unsharded parameters for the
    length of the step (one layer's worth is what plain ZeRO-3 holds).

What DeepSpeed does in engine.backward(loss) and the engine step keeps: the division by
gradient_accumulation_steps (scale_wrt_gas) is applied to the gradients (loss_scale), and engine.step()
is the user's. Refused, with the reason: fp16 dynamic loss scaling (the chunk backwards would need the
scaler's factor and overflow check), gradient_accumulation_steps > 1 (DeepSpeed's coalesced reduction
covers one with-block per optimizer step), pipeline parallelism, ZeRO stage 0 (nothing to coalesce;
wrap the module in DDP instead), and managed_gradient_accumulation=False.

DeepSpeed internals used (0.19.8; `check_engine` names what is missing on another version):
  DeepSpeedEngine.coalesce_grad_reduction, zero_optimization_stage, gradient_accumulation_steps,
  pipeline_parallelism, managed_gradient_accumulation, optimizer (a ZeRO optimizer with
  _coalesce_grad_reduction, needs_scaler); ZeRO-3 parameters' ds_id, ds_status, ds_active_sub_modules;
  deepspeed.zero.GatheredParameters.
No transformers import here.
"""
from __future__ import annotations

import contextlib
import functools

from torch import nn

_MARKER = -0x5EC0  # a ds_id no DeepSpeed module has: "seqwrap's step is using this parameter"
_ENGINE_ATTRS = ("coalesce_grad_reduction", "zero_optimization_stage", "gradient_accumulation_steps",
                 "managed_gradient_accumulation", "optimizer", "module")


def is_deepspeed_engine(model) -> bool:
    """True when `model` is a deepspeed.DeepSpeedEngine (without importing deepspeed when it is not
    loaded: a model cannot be an engine then)."""
    import sys

    ds = sys.modules.get("deepspeed")
    if ds is None:
        return False
    engine_cls = getattr(getattr(getattr(ds, "runtime", None), "engine", None), "DeepSpeedEngine", None)
    return engine_cls is not None and isinstance(model, engine_cls)


def zero3_params(module: nn.Module) -> list:
    """The parameters of `module` that ZeRO-3 partitions (they carry a ds_id)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def check_engine(engine, name: str) -> int:
    """Raises with the reason when the chunked step cannot drive this engine; returns its ZeRO stage."""
    import deepspeed

    missing = [a for a in _ENGINE_ATTRS if not hasattr(engine, a)]
    if missing:
        raise RuntimeError(f"seqwrap.{name}: this DeepSpeed ({deepspeed.__version__}) lacks the engine API the chunked "
                           f"step relies on: {missing} (tested with deepspeed 0.19.8)")
    stage = int(engine.zero_optimization_stage())
    if stage == 0:
        raise ValueError(f"seqwrap.{name}: a DeepSpeed engine without ZeRO (stage 0) has no coalesced gradient "
                         "reduction to drive; use ZeRO stage 1, 2 or 3, or give the engine the plain module "
                         "wrapped in torch DistributedDataParallel")
    if engine.optimizer is None or not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
        raise ValueError(f"seqwrap.{name}: the DeepSpeed engine's optimizer "
                         f"({type(engine.optimizer).__name__}) is not a ZeRO optimizer whose reduction can be "
                         "coalesced over a step (DeepSpeed's BF16/FP16 optimizer wrappers are not supported)")
    if getattr(engine, "pipeline_parallelism", False):
        raise ValueError(f"seqwrap.{name}: DeepSpeed pipeline parallelism is not supported")
    if not engine.managed_gradient_accumulation():
        raise ValueError(f"seqwrap.{name}: managed_gradient_accumulation=False is not supported (the chunked step "
                         "coalesces one optimizer step's reduction)")
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError(f"seqwrap.{name}: DeepSpeed gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()} is not supported: one engine call is one "
                         "optimizer step's backward (DeepSpeed coalesces one reduction per step); set it to 1 and "
                         "put the accumulated sequences in one call (rows of the batch)")
    needs_scaler = getattr(engine.optimizer, "needs_scaler", None)
    if callable(needs_scaler) and needs_scaler():
        raise ValueError(f"seqwrap.{name}: fp16 with loss scaling is not supported under DeepSpeed (each chunk "
                         "backward would need the scaler's factor and overflow check); use bf16 or fp32")
    return stage


class DeepSpeedStep:
    """Drives one chunked engine step over a DeepSpeedEngine (`with ds_step.step(): ...`)."""

    def __init__(self, engine, name: str):
        self.stage = check_engine(engine, name)
        self.engine, self.name = engine, name
        self.module = engine.module
        self.active = False

    @contextlib.contextmanager
    def step(self):
        """ZeRO-3: gather every parameter once and hold it; every stage: one coalesced reduction at the end.

        A failed step: the engine restores the gradients the step started with (none under ZeRO-2/3, which
        move them into their partitions), so DeepSpeed's closing reduction finds nothing of that step."""
        if self.active:
            raise RuntimeError(f"seqwrap.{self.name}: a DeepSpeed step is already running on this engine")
        check_engine(self.engine, self.name)  # the config may have changed (e.g. gradient_accumulation_steps)
        self.active = True
        try:
            with self.engine.coalesce_grad_reduction():
                with self._gathered():
                    yield self
        finally:
            self.active = False

    @contextlib.contextmanager
    def _gathered(self):
        if self.stage != 3:
            yield
            return
        import deepspeed

        params = zero3_params(self.module)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                p.ds_active_sub_modules.add(_MARKER)   # ZeRO-3's hooks: in use, do not release
            try:
                yield
            finally:
                for p in params:
                    p.ds_active_sub_modules.discard(_MARKER)


def deepspeed_step_for(model, name: str) -> DeepSpeedStep | None:
    """A DeepSpeedStep when `model` is a DeepSpeedEngine, else None."""
    return DeepSpeedStep(model, name) if is_deepspeed_engine(model) else None


def deepspeed_step(method):
    """Decorator for an engine's training step: runs it inside self._deepspeed.step() when the engine
    has one, with DeepSpeed's 1/gradient_accumulation_steps on the gradients (always 1 today)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        ds = getattr(self, "_deepspeed", None)
        if ds is None:
            return method(self, *args, **kwargs)
        with ds.step():
            return method(self, *args, **kwargs)
    return wrapper
