"""Ulysses sequence parallelism under a DeepSpeed ZeRO engine: what ZeRO's reduction divides by, and the
factor on the chunk backwards that turns it into the sum over the sequence ranks.

Under Ulysses the P ranks of a sequence group each hold part of one sequence: the gradient of the whole
sequence is the SUM of their gradients. ZeRO reduces over its data-parallel group (the engine's
seq_data_parallel_group, N ranks: the optimizer's dp_process_group) and divides the summed gradients by
a divisor D that DeepSpeed 0.19.8 chooses per stage and configuration:

  stage 1/2 (stage_1_and_2.py: average_tensor, gradient_reduction_w_predivide, allreduce_bucket):
      D = N / sequence_parallel_size  (gradient_allreduce_op "mean", the default); D = 1 for "sum"
  stage 3, reduce_scatter=true (the default; stage3.py __avg_scatter_grads -> reduce_scatter_coalesced,
      which pre-divides by the partition group's size and never reads sequence_parallel_size):
      D = N, with or without a sequence-parallel mpu
  stage 3, reduce_scatter=false, no sequence-parallel mpu: D = N in both of its paths
  stage 3, reduce_scatter=false with a sequence-parallel mpu: D = N / sp for a bucket that went through
      the contiguous buffer (__avg_scatter_contiguous_grads) but N for one that did not (a parameter
      larger than reduce_bucket_size, or contiguous_gradients=false): refused, no single factor is exact.

sequence_parallel_size is what an mpu given to deepspeed.initialize declares (DeepSpeed's own
deepspeed.runtime.sequence_parallel.parallel_state_sp, or any object with its functions); without one
it is 1. What the whole-sequence step needs is sum over the sequence ranks, mean over the N / P
data-parallel replicas, so the chunk backwards are scaled by

    s = D * P / N      (s = 1 where DeepSpeed divides by the replicas itself: stage 1/2 with the mpu)

(P = 2 here: s is 1 or 2, exact in floating point). Checked when the engine is built (SeCO / SpaCO):
the data-parallel group must contain the Ulysses ranks and be made of whole Ulysses groups (N a multiple
of P); a sequence-parallel mpu must declare the Ulysses group itself; gradient_predivide_factor must be 1
(DeepSpeed's post-division skips its correction when the factor equals N: stage_1_and_2.py
gradient_reduction_w_predivide); quantized gradients (ZeRO++) and MoE layers are refused.

The chunked engines scale their chunk backwards by s themselves. A plain `engine.backward(loss)` of a
Ulysses-patched module (MsT, plain Ulysses training) gets the same factor from
seqwrap.parallel.deepspeed_ulysses(engine) (seqwrap/hf/ulysses.py), called once after
deepspeed.initialize: the module's outputs then carry s into their gradients (scale_output_grads; the
forward values are untouched), so every parameter gradient reached through the outputs is multiplied
by s. A training forward of a ZeRO-managed Ulysses module without that call is refused
(zero_managed: the marks ZeRO leaves on the parameters), since its gradient would be D/N of the sum
(1/P of the whole sequence's without an mpu).
No transformers import here.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _ranks(group) -> list[int]:
    return sorted(int(r) for r in dist.get_process_group_ranks(group))


def zero_divisor(engine, name: str) -> tuple[int, float]:
    """(N, D): the size of the group ZeRO reduces over and what its reduction divides the summed
    gradients by (module docstring). Raises where D is not one number for every bucket."""
    opt = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    needed = ["dp_process_group", "sequence_parallel_size", "gradient_predivide_factor", "postscale_gradients",
              "reduce_scatter"] + (["contiguous_gradients"] if stage == 3 else ["gradient_average"])
    missing = [a for a in needed if not hasattr(opt, a)]
    if missing:
        raise RuntimeError(f"seqwrap.{name}: this DeepSpeed's ZeRO-{stage} optimizer lacks {missing}, which the "
                           "Ulysses reduction factor is derived from (tested with deepspeed 0.19.8)")
    n = dist.get_world_size(opt.dp_process_group)
    sp = int(opt.sequence_parallel_size)
    if float(opt.gradient_predivide_factor) != 1.0:
        raise ValueError(f"seqwrap.{name}: gradient_predivide_factor={opt.gradient_predivide_factor} is not supported "
                         "under Ulysses: DeepSpeed's division then depends on the factor (it skips its correction "
                         "when the factor equals the group size); leave it at 1.0")
    if stage in (1, 2):
        return n, (n / sp if opt.gradient_average else 1.0)
    if opt.reduce_scatter or sp == 1:
        return n, float(n)
    raise ValueError(f"seqwrap.{name}: ZeRO-3 with reduce_scatter=false and a sequence-parallel mpu divides the "
                     "buckets of its contiguous gradient buffer by dp and the others (contiguous_gradients=false, or a "
                     "parameter larger than reduce_bucket_size) by dp x sp (deepspeed stage3.py "
                     "__avg_scatter_contiguous_grads / __avg_scatter_grads), so no single factor makes the step "
                     "exact: set zero_optimization.reduce_scatter=true (the default), or build the engine without "
                     "the mpu")


def reduction_scale(engine, group, name: str) -> float:
    """s: the factor on a Ulysses step's chunk backwards under this engine (module docstring); raises
    naming the problem for a setup it cannot make exact."""
    if getattr(engine, "has_moe_layers", False):
        raise ValueError(f"seqwrap.{name}: MoE layers under Ulysses x DeepSpeed are not supported (their experts "
                         "reduce over expert data-parallel groups)")
    quantized = getattr(engine, "zero_quantized_gradients", None)
    if callable(quantized) and quantized():
        raise ValueError(f"seqwrap.{name}: zero_quantized_gradients (ZeRO++) is not supported under Ulysses: the "
                         "quantized reduction is not exact")
    ulysses = _ranks(group)
    dp = _ranks(engine.optimizer.dp_process_group)
    missing = sorted(set(ulysses) - set(dp))
    if missing:
        raise ValueError(f"seqwrap.{name}: the DeepSpeed engine's data-parallel group (ranks {dp}) does not contain "
                         f"the Ulysses ranks {missing}: ZeRO's reduction must sum the sequence ranks' gradients; build "
                         "the engine over the same ranks, or with an mpu whose sequence-data-parallel group holds "
                         "whole Ulysses groups (deepspeed.initialize(..., mpu=...))")
    p, n = len(ulysses), len(dp)
    if n % p:
        raise ValueError(f"seqwrap.{name}: the DeepSpeed engine's data-parallel group has {n} ranks, not a multiple "
                         f"of the {p} Ulysses ranks: it must be made of whole Ulysses groups")
    sp = int(engine.optimizer.sequence_parallel_size)
    if sp > 1:
        sp_group = getattr(engine, "seq_parallel_group", None)
        sp_ranks = None if sp_group is None else _ranks(sp_group)
        if sp_ranks != ulysses:
            raise ValueError(f"seqwrap.{name}: the DeepSpeed engine was built with a sequence-parallel mpu whose group "
                             f"(ranks {sp_ranks}, size {sp}) is not the Ulysses group (ranks {ulysses}): pass "
                             "apply_ulysses(model, group=mpu.get_sequence_parallel_group())")
    n_ranks, divisor = zero_divisor(engine, name)
    return divisor * p / n_ranks


def zero_managed(module) -> int:
    """The ZeRO stage managing `module`'s trainable parameters, from the marks DeepSpeed 0.19.8 leaves on
    them (0 when none): ZeRO-3 partitions every parameter (ds_id), ZeRO-1/2 number each trainable
    parameter in its flat group (param_idx_in_group, stage_1_and_2.py). 12 means "stage 1 or 2".
    Runs at every Ulysses forward: nothing to look at unless deepspeed was imported."""
    if "deepspeed" not in sys.modules:
        return 0
    for p in module.parameters():
        if hasattr(p, "ds_id"):
            return 3
        if p.requires_grad:
            return 12 if hasattr(p, "param_idx_in_group") else 0
    return 0


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (a view); the backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scaled(value, scale):
    if isinstance(value, torch.Tensor):
        return _ScaleGrad.apply(value, scale) if value.requires_grad else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):   # hidden_states / attentions tuples
        return tuple(_scaled(v, scale) for v in value)
    return value


def scale_output_grads(output, scale: float):
    """`output` (a tensor, tuple, dict or transformers ModelOutput) with every tensor that requires grad,
    at the top level or in a tuple there, wrapped so that its gradient is multiplied by `scale`; caches
    and other objects pass through. Values are unchanged (views)."""
    if isinstance(output, dict):          # ModelOutput is an OrderedDict: item assignment keeps both views
        for key in list(output.keys()):
            output[key] = _scaled(output[key], scale)
        return output
    return _scaled(output, scale)
