"""FSDP2 (torch.distributed.fsdp.fully_shard) under the chunked engines: the communication schedule.

A chunked step (SeCO, SpaCO, AdjointSharding) runs one forward per chunk without grad, then one
forward + backward per chunk, and it calls the decoder and the LM head directly, not the root module.
Left to FSDP2's hooks, every decoder layer would be all-gathered 3 times per chunk (pass-1 forward,
pass-2 forward, pass-2 backward) and reduce-scattered once per chunk backward, and the root's own
parameters (embeddings, final norm, LM head: the root's forward never runs) would stay sharded.

FSDPStep drives one engine step instead (FSDPSchedule picks how):

  params="step" (default)  every FSDP group is all-gathered once when the step begins and stays
                           unsharded until it ends: one all-gather per group per step (plain FSDP2
                           backprop: two per layer, forward and backward). Costs the unsharded
                           parameters for the length of the step, in FSDP's param_dtype.
  params="layer"           only the root's group is held for the step; the layers keep FSDP's own
                           per-use all-gather and reshard (least memory: about one layer unsharded;
                           about 3 all-gathers per layer per chunk). SeCO / SpaCO only.
  grads="step" (default)   gradient sync is off for the chunk backwards; the unsharded gradients
                           accumulate (in FSDP's reduce_dtype) and the step ends with one
                           reduce-scatter per group that has gradients, exactly where plain FSDP2
                           backprop reduce-scatters. Costs the unsharded gradients of the trainable
                           parameters (small under LoRA).
  grads="chunk"            FSDP reduce-scatters after every chunk backward (sharded gradients
                           only; one reduce-scatter per group per recomputed chunk). SeCO / SpaCO.

The step ends with FSDP's own reduction (its mixed-precision reduce dtype, gradient divide factor,
CPU offload of the sharded gradients) and reshards as the user's settings ask; what the user set
(set_requires_gradient_sync(False) for accumulation, set_reshard_after_backward...) holds after the
step exactly as after a plain backward. A failed step leaves the sharded gradients, the accumulated
unsharded ones and the settings as they were, and the parameters resharded.

FSDP2 internals used (torch 2.13; `check_internals` names the one that is missing on another torch):
  FSDPModule._get_fsdp_state(); FSDPState._is_root, _lazy_init(), _fsdp_param_groups,
  _training_state, _root_post_backward_final_callback() (the reduction FSDP runs at the end of a
  backward); FSDPParamGroup.post_forward_mesh_info, reshard_after_backward, reduce_grads,
  all_reduce_grads, fsdp_params; FSDPParam.sharded_param, unsharded_accumulated_grad, _unsharded_param
  (its .grad).
Public API used: FSDPModule.unshard(), reset_iter_state(); torch.distributed.all_gather_single /
reduce_scatter_single (what FSDP2's default collectives call; count_collectives wraps them).

No transformers import here.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .grad_sync import restore_grads, stash_grads, unstash_grads

_PARAMS = ("step", "layer")
_GRADS = ("step", "chunk")
_STATE_ATTRS = ("_is_root", "_lazy_init", "_fsdp_param_groups", "_training_state",
                "_root_post_backward_final_callback")
_GROUP_ATTRS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads",
                "fsdp_params")
_SETTINGS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")


@dataclass(frozen=True)
class FSDPSchedule:
    """How a chunked step drives an FSDP2 model (see the module docstring).

    params: "step" (all-gather once per step) or "layer" (FSDP's own per-layer gather / reshard).
    grads:  "step" (one reduce-scatter per step) or "chunk" (one per chunk backward).
    """

    params: str = "step"
    grads: str = "step"

    def __post_init__(self):
        if self.params not in _PARAMS:
            raise ValueError(f"seqwrap.FSDPSchedule: params must be one of {_PARAMS}, not {self.params!r}")
        if self.grads not in _GRADS:
            raise ValueError(f"seqwrap.FSDPSchedule: grads must be one of {_GRADS}, not {self.grads!r}")

    @property
    def count_dependent(self) -> bool:
        """Whether the number of collectives of a step depends on its chunks (params="layer": gathers
        per chunk forward; grads="chunk": reduce-scatters per chunk backward)."""
        return self.params == "layer" or self.grads == "chunk"


def _fsdp_module_class():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules (fully_shard applied) of `model`, in pre-order (the root first)."""
    cls = _fsdp_module_class()
    return [m for m in model.modules() if isinstance(m, cls)]


def is_fsdp2(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def check_internals(state, engine: str) -> None:
    """Raises naming the FSDP2 internal this torch lacks (the schedule relies on each of them)."""
    missing = [f"FSDPState.{a}" for a in _STATE_ATTRS if not hasattr(state, a)]
    for group in getattr(state, "_fsdp_param_groups", []):
        missing += [f"FSDPParamGroup.{a}" for a in _GROUP_ATTRS if not hasattr(group, a)]
        for fp in getattr(group, "fsdp_params", []):
            missing += [f"FSDPParam.{a}" for a in ("sharded_param", "unsharded_accumulated_grad")
                        if not hasattr(fp, a)]
    if missing:
        raise RuntimeError(f"seqwrap.{engine}: this torch ({torch.__version__}) lacks the FSDP2 internals the "
                           f"chunked step relies on: {sorted(set(missing))} (tested with torch 2.13)")


class FSDPStep:
    """Drives one chunked engine step over an FSDP2 model (`with fsdp_step.step(): ...`).

    model: the module the engine was given; all its FSDP2 modules must sit under one root FSDP2
    module (fully_shard applied to the decoder layers and to the model, as FSDP2 expects).
    """

    def __init__(self, model: nn.Module, schedule: FSDPSchedule | None, engine: str, *, hooks: bool = True):
        schedule = FSDPSchedule() if schedule is None else schedule
        if not isinstance(schedule, FSDPSchedule):
            raise TypeError(f"seqwrap.{engine}: fsdp must be a seqwrap.FSDPSchedule or None, "
                            f"not {type(schedule).__name__}")
        if not hooks and schedule != FSDPSchedule():
            raise ValueError(f"seqwrap.{engine}: runs its layers outside their module calls, so FSDP2's hooks "
                             f"never fire: only FSDPSchedule(params='step', grads='step') applies, not {schedule}")
        modules = fsdp_modules(model)
        if not modules:
            raise ValueError(f"seqwrap.{engine}: the model has no FSDP2 (fully_shard) module")
        root = modules[0]
        inside = set(map(id, root.modules()))
        outside = [type(m).__name__ for m in modules[1:] if id(m) not in inside]
        if outside:
            raise ValueError(f"seqwrap.{engine}: the FSDP2 modules of the model have no common root FSDP2 module "
                             f"({type(root).__name__} does not contain {outside}); apply fully_shard to the "
                             "model itself after its layers")
        self.engine, self.schedule = engine, schedule
        self.root, self.modules = root, modules
        self.active = False
        for m in modules:
            check_internals(m._get_fsdp_state(), engine)

    # -- the groups ------------------------------------------------------------------------------
    def _groups(self, modules=None):
        """The FSDP param groups of `modules` (default: all), each once (fully_shard([a, b]) gives two
        modules one state)."""
        states = {id(s): s for s in (m._get_fsdp_state() for m in (modules or self.modules))}
        return [g for s in states.values() for g in s._fsdp_param_groups]

    def _lazy_init(self) -> None:
        """FSDP2 picks its root at the first forward; the engine never runs the root's forward, so the
        root is initialised here (else the first layer to run would make itself a root)."""
        state = self.root._get_fsdp_state()
        if state._is_root is None:
            state._lazy_init()
        elif not state._is_root:
            raise ValueError(f"seqwrap.{self.engine}: the model's outermost FSDP2 module "
                             f"({type(self.root).__name__}) is not FSDP2's root: another fully_shard module "
                             "contains it; give the engine the root module")

    # -- one step --------------------------------------------------------------------------------
    def schedule_for(self, agreed) -> FSDPSchedule:
        """The schedule of one step, given the ranks' agreement (parallel/agreement.py): the user's, unless
        its collective count depends on the chunks and the ranks' chunks differ; then, for this call
        only, the count-independent default (one all-gather and one reduce-scatter per group), with a
        warning: otherwise the ranks would issue different numbers of collectives and hang."""
        if agreed is None or agreed.uniform or not self.schedule.count_dependent:
            return self.schedule
        warnings.warn(f"seqwrap.{self.engine}: the ranks run different chunks this step ({agreed.min_chunks} to "
                      f"{agreed.max_chunks} chunks, or different recomputed chunks), so {self.schedule} would issue "
                      "different numbers of collectives on different ranks; this step uses FSDPSchedule() "
                      "(params='step', grads='step': one all-gather and one reduce-scatter per group)",
                      UserWarning, stacklevel=3)
        return FSDPSchedule()

    @contextlib.contextmanager
    def step(self, schedule: FSDPSchedule | None = None):
        """Unshard for the step, run it, reduce once; on failure undo everything. schedule: this call's
        (default: the engine's)."""
        schedule = schedule or self.schedule
        if self.active:
            raise RuntimeError(f"seqwrap.{self.engine}: an FSDP2 step is already running on this model")
        self._lazy_init()
        groups = self._groups()
        settings = [{a: getattr(g, a) for a in _SETTINGS} for g in groups]
        fsdp_params = [fp for g in groups for fp in g.fsdp_params]
        sharded = [fp.sharded_param for fp in fsdp_params if fp.sharded_param.requires_grad]  # DTensors
        accumulated = [fp.unsharded_accumulated_grad for fp in fsdp_params]
        unsharded = [_unsharded_grad(fp) for fp in fsdp_params]
        stash = stash_grads(sharded)
        self.active = True
        try:
            held = self.modules if schedule.params == "step" else [self.root]
            for g in self._groups(held):
                g.post_forward_mesh_info = None          # no reshard after forward
                g.reshard_after_backward = False
            if schedule.grads == "step":
                for g in groups:
                    g.reduce_grads = g.all_reduce_grads = False
            for m in held:
                m.unshard()                               # one all-gather per group
            yield self
            for g, saved in zip(groups, settings):        # the user's settings for the reduction
                for a, v in saved.items():
                    setattr(g, a, v)
            # FSDP's own end-of-backward: post_backward (reduce-scatter of the accumulated unsharded
            # gradients, reshard as reshard_after_backward says) for every group, then finalize.
            self.root._get_fsdp_state()._root_post_backward_final_callback()
        except BaseException:
            for g, saved in zip(groups, settings):
                for a, v in saved.items():
                    setattr(g, a, v)
            self.root.reset_iter_state()                  # waits, reshards every group
            for fp, acc, grad in zip(fsdp_params, accumulated, unsharded):
                fp.unsharded_accumulated_grad = acc
                if getattr(fp, "_unsharded_param", None) is not None:
                    fp._unsharded_param.grad = grad
            restore_grads(sharded, stash)
            raise
        finally:
            self.active = False
        unstash_grads(sharded, stash)


def _unsharded_grad(fsdp_param):
    """.grad of the parameter's unsharded tensor (None before its first all-gather)."""
    p = getattr(fsdp_param, "_unsharded_param", None)
    return None if p is None else p.grad


def fsdp_step_for(model: nn.Module, schedule, engine: str, *, hooks: bool = True) -> FSDPStep | None:
    """An FSDPStep when `model` holds FSDP2 modules, else None (schedule must then be None)."""
    if not is_fsdp2(model):
        if schedule is not None:
            raise ValueError(f"seqwrap.{engine}: fsdp={schedule!r} given but the model has no FSDP2 "
                             "(fully_shard) module")
        return None
    return FSDPStep(model, schedule, engine, hooks=hooks)


def fsdp_step(method):
    """Decorator for an engine's __call__: runs it inside self._fsdp.step() when the engine has one."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        sched = getattr(self, "_fsdp", None)
        if sched is None:
            return method(self, *args, **kwargs)
        with sched.step():
            return method(self, *args, **kwargs)
    return wrapper


# -- counting ------------------------------------------------------------------------------------
@dataclass
class CollectiveCounts:
    """Collectives seen on this rank: calls and bytes of the full (gathered / to-be-reduced) buffer.

    all_gather_bytes: size of each all-gather's output (the unsharded parameters, param_dtype);
    reduce_scatter_bytes: size of each reduce-scatter's input (the unsharded gradients, reduce_dtype);
    a ring moves (world-1)/world of that per rank each way."""

    all_gathers: int = 0
    all_gather_bytes: int = 0
    reduce_scatters: int = 0
    reduce_scatter_bytes: int = 0
    all_reduces: int = 0
    all_reduce_bytes: int = 0
    all_to_alls: int = 0       # all_to_all_single (Ulysses); bytes: each call's input (what one rank sends,
    all_to_all_bytes: int = 0  # its own block included: (world-1)/world of it leaves the rank)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


@contextlib.contextmanager
def count_collectives():
    """Counts torch.distributed all_gather_single (FSDP2's all-gathers), reduce_scatter_single (its
    reduce-scatters), all_reduce and all_to_all_single (Ulysses) calls made inside the block, on this rank."""
    counts = CollectiveCounts()
    saved = {n: getattr(dist, n) for n in ("all_gather_single", "reduce_scatter_single", "all_reduce",
                                     "all_to_all_single")}

    def all_gather_single(output_tensor, input_tensor, *a, **k):
        counts.all_gathers += 1
        counts.all_gather_bytes += _nbytes(output_tensor)
        return saved["all_gather_single"](output_tensor, input_tensor, *a, **k)

    def reduce_scatter_single(output, input, *a, **k):
        counts.reduce_scatters += 1
        counts.reduce_scatter_bytes += _nbytes(input)
        return saved["reduce_scatter_single"](output, input, *a, **k)

    def all_reduce(tensor, *a, **k):
        counts.all_reduces += 1
        counts.all_reduce_bytes += _nbytes(tensor)
        return saved["all_reduce"](tensor, *a, **k)

    def all_to_all_single(output, input, *a, **k):
        counts.all_to_alls += 1
        counts.all_to_all_bytes += _nbytes(input)
        return saved["all_to_all_single"](output, input, *a, **k)

    dist.all_gather_single = all_gather_single
    dist.reduce_scatter_single = reduce_scatter_single
    dist.all_reduce = all_reduce
    dist.all_to_all_single = all_to_all_single
    try:
        yield counts
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
