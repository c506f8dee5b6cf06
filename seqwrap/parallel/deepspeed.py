"""DeepSpeed ZeRO (stages 1, 2, 3) under the chunked engines: gather once, reduce once per step.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, ...)
    seco = seqwrap.SeCO(engine, chunk_size=4096)       # the DeepSpeedEngine itself
    for batch in loader:
        seco(**batch)                                  # forward + backward of the whole sequence
        engine.step()                                  # DeepSpeed's optimizer step, as after engine.backward
    # Ulysses: apply_ulysses(model, group) before deepspeed.initialize, then
    # seco(**seqwrap.parallel.shard_batch(batch, group, chunk_size=4096)) (ulysses_deepspeed.py)

A chunked step runs one backward per recomputed chunk and calls the decoder layers directly. Left to
ZeRO's hooks, every backward would reduce(-scatter) the gradients of the parameters it touched (ZeRO-2
and ZeRO-3 reduce per backward), and ZeRO-3 would all-gather every layer at each use (pass-1 forward,
pass-2 forward and backward of every chunk) and release it after. DeepSpeedStep drives the step instead:

  * DeepSpeed's public `engine.coalesce_grad_reduction()` holds the step: the chunk backwards leave
    their gradients on the parameters (full size, accumulated), and when the step ends DeepSpeed runs
    one reduction pass over them (its own buckets, averaging over the data-parallel group, partitioned
    fp32 gradients where ZeRO-2/3 keep them), exactly what engine.step() then reads.
  * ZeRO-3: every parameter of the model is all-gathered once when the step begins
    (deepspeed.zero.GatheredParameters; on gloo that is one all-gather per parameter, per step, not per
    chunk) and re-partitioned when it ends; while the step runs, ZeRO-3's module hooks (fetch before a
    module call, release after, the pre/post-backward functions, the root's trace reset) are taken out
    of the modules' hook dicts and put back afterwards (_suspended), so they neither release, re-gather
    nor record a prefetch trace that would differ between ranks. Costs the unsharded parameters for the
    length of the step (one layer's worth is what plain ZeRO-3 holds).

  * ZeRO-1 with a gradient accumulation dtype other than the parameters' (e.g. a float64 or bf16 model,
    float32 accumulation): DeepSpeed's reduction reads param.grad_accum, which only engine.backward's
    epilogue fills; the step fills it before the flush (_park_grad_accum).
  * Ulysses (a module patched by apply_ulysses): ZeRO reduces over its data-parallel group and divides by
    a number DeepSpeed picks per stage and mpu; the chunk backwards are scaled so that the reduction sums
    the sequence ranks (parallel/ulysses_deepspeed.py, checked when the engine is built).

What DeepSpeed does in engine.backward(loss) and the engine step keeps: the division by
gradient_accumulation_steps (scale_wrt_gas) is applied to the gradients (loss_scale), and engine.step()
is the user's. Refused, with the reason: fp16 dynamic loss scaling (the chunk backwards would need the
scaler's factor and overflow check), gradient_accumulation_steps > 1 (DeepSpeed's coalesced reduction
covers one with-block per optimizer step), pipeline parallelism, ZeRO stage 0 (nothing to coalesce;
wrap the module in DDP instead), and managed_gradient_accumulation=False.

DeepSpeed internals used (0.19.8; `check_engine` names what is missing on another version):
  DeepSpeedEngine.coalesce_grad_reduction, zero_optimization_stage, gradient_accumulation_steps,
  pipeline_parallelism, managed_gradient_accumulation, optimizer (a ZeRO optimizer with
  _coalesce_grad_reduction, needs_scaler, parameter_offload.forward_hooks / backward_hooks /
  fwd_pre_hook; ZeRO-1: use_grad_accum_attribute, fill_grad_accum_attribute); ZeRO-3 parameters' ds_id
  and ds_shape; deepspeed.zero.GatheredParameters. Under Ulysses also (ulysses_deepspeed.py) the
  optimizer's dp_process_group, sequence_parallel_size, gradient_predivide_factor, reduce_scatter,
  gradient_average and the engine's seq_parallel_group; for the refusal of an unprepared plain
  engine.backward (ulysses_deepspeed.zero_managed) the marks ZeRO leaves on parameters: ds_id (ZeRO-3)
  and param_idx_in_group (ZeRO-1/2).
Measured in tests/test_deepspeed_zero.py (ZeRO-1/2/3) and tests/test_deepspeed_ulysses.py (Ulysses x
ZeRO-1/2/3, with and without DeepSpeed's sequence-parallel mpu), 2 gloo ranks, and
tests/test_deepspeed_ulysses_4ranks.py (sp 4, sp 2 x dp 2), plain engine.backward and MsT under
Ulysses in tests/test_deepspeed_ulysses_backward.py, CPU: ZeRO keeps float32
gradient partitions, so a float64 model's gradients come back rounded to float32 (equal to 1e-6).
SeqwrapTrainer with accelerate's DeepSpeed plugin (hf/trainer.py): tests/test_deepspeed_trainer.py.
No transformers import here.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

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


def full_shape(p) -> torch.Size:
    """A parameter's logical shape: ZeRO-3 keeps a partitioned parameter's in ds_shape (p.shape is then
    the empty placeholder's)."""
    return getattr(p, "ds_shape", None) or p.shape


_HELD = "_seqwrap_step_holds"  # set on a ZeRO-3 parameter while a DeepSpeedStep holds it gathered


def unheld_zero3(params) -> bool:
    """True when one of `params` is a ZeRO-3 parameter that no seqwrap step holds gathered: ZeRO-3's module
    hooks own it (fetched when its module is called, released after), so code that reads it outside its
    module's call (MsT's recompute on parameter aliases, a fused LM-head loss) would find it partitioned."""
    return any(hasattr(p, "ds_id") and not getattr(p, _HELD, False) for p in params)


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

    @property
    def group(self):
        """The ranks whose gradients ZeRO reduces together (sequence x data parallel): the ranks that must
        agree on a step before its first collective (parallel/agreement.py)."""
        return getattr(self.engine, "seq_data_parallel_group", None) or self.engine.data_parallel_group

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
                self._park_grad_accum()
        finally:
            self.active = False

    def _park_grad_accum(self):
        """ZeRO-1 with a gradient accumulation dtype other than the parameters' (use_grad_accum_attribute):
        DeepSpeed's reduction reads param.grad_accum, which engine.backward's epilogue fills from .grad
        (stage_1_and_2.py backward_epilogue); the chunk backwards are plain torch backwards, so the step
        fills it once here, before the coalesced reduction (without it the flush finds no gradient and
        reduces nothing: measured, tests/test_deepspeed_ulysses.py zero1 cases)."""
        opt = self.engine.optimizer
        if getattr(opt, "use_grad_accum_attribute", False):
            opt.fill_grad_accum_attribute()

    @contextlib.contextmanager
    def _gathered(self):
        """ZeRO-3: every parameter all-gathered once (one GatheredParameters) and ZeRO-3's module hooks
        suspended while the step runs; stages 1/2: nothing (their parameters are whole)."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        params = zero3_params(self.module)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            with _suspended(zero3_hooks(self.engine, self.name)):
                for p in params:
                    setattr(p, _HELD, True)
                try:
                    yield
                finally:
                    for p in params:
                        delattr(p, _HELD)


def zero3_hooks(engine, name: str) -> list:
    """The handles of ZeRO-3's module hooks (fetch before a module runs, release after, and the
    pre/post-backward autograd functions around its outputs): DeepSpeedZeRoOffload's forward_hooks,
    backward_hooks and the root's fwd_pre_hook (which resets the prefetch trace)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None or not all(hasattr(offload, a) for a in ("forward_hooks", "backward_hooks", "fwd_pre_hook")):
        raise RuntimeError(f"seqwrap.{name}: this DeepSpeed's ZeRO-3 optimizer does not expose its module hooks "
                           "(parameter_offload.forward_hooks / backward_hooks / fwd_pre_hook, as deepspeed 0.19.8 "
                           "does); the chunked step cannot hold the gathered parameters over them")
    return list(offload.forward_hooks) + list(offload.backward_hooks) + [offload.fwd_pre_hook]


@contextlib.contextmanager
def _suspended(handles):
    """Takes the hooks of `handles` (torch RemovableHandles) out of their modules' hook dicts and puts
    them back afterwards, in their original order among the module's other hooks.

    Why: ZeRO-3 ties a module call to a fetch and a release and records the call order as a prefetch
    trace; a chunked step calls each layer once per chunk and pass (and the root module never), so the
    hooks would re-gather released layers per chunk, leave the parameters of modules whose backward
    hook does not fire marked in use, and check a trace that differs between ranks under SpaCO. The
    parameters are gathered for the whole step instead, so nothing needs the hooks meanwhile."""
    taken = {}  # id(dict) -> (dict, its items before, {hook id: hook} taken out); the kwargs / always-call
    #             side tables stay: torch reads them only for hook ids found in the main dict
    for h in handles:
        d = h.hooks_dict_ref()
        if d is None or h.id not in d:
            continue
        entry = taken.setdefault(id(d), (d, list(d.items()), {}))
        entry[2][h.id] = d.pop(h.id)
    try:
        yield
    finally:
        for d, before, out in taken.values():
            now = dict(d)
            d.clear()
            for k, v in before:
                if k in out or k in now:
                    d[k] = out.get(k, now.get(k))
            for k, v in now.items():
                if k not in d:
                    d[k] = v


def deepspeed_step_for(model, name: str) -> DeepSpeedStep | None:
    """A DeepSpeedStep when `model` is a DeepSpeedEngine, else None."""
    return DeepSpeedStep(model, name) if is_deepspeed_engine(model) else None
