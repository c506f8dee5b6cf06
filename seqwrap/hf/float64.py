"""pure_float64(): float64 means float64 inside Hugging Face models.

HF modules cast to float32 inside, even in a float64 model: RMSNorms (`x.to(torch.float32)`), rotary
frequencies (`inv_freq.float()`), eager attention softmaxes (`softmax(..., dtype=torch.float32)`),
HF's causal-LM loss (`logits.float()`), the SSM scans. Their float64 results then carry float32
rounding that depends on how the sequence is cut, so a chunked step and full backprop of the same
model differ by ~1e-7 for reasons that are not seqwrap's. Within `pure_float64()` those casts are
no-ops for float64 tensors, and the model computes in float64 throughout.

Used by seqwrap.verify (seqwrap/hf/verify.py) and by the tests. A TorchFunctionMode only acts on the
thread that entered it and not inside autograd's backward (a recompute there, as in reentrant
checkpointing or MsT's MLP backward, runs the model's own casts).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# matrix products whose float32 x float64 operands are promoted to float64 (torch refuses mixed dtypes)
_PRODUCTS = (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.bmm, torch.mm)


def _dtype_arg(args, kwargs):
    """The dtype a `Tensor.to(...)` / `Tensor.type(...)` call asks for (None: no dtype given)."""
    if "dtype" in kwargs:
        return kwargs["dtype"]
    return next((a for a in args[1:] if isinstance(a, torch.dtype)), None)


class pure_float64(TorchFunctionMode):
    """Within the block, for a float64 tensor x:

    - `x.float()`, `x.to(torch.float32, ...)`, `x.type(torch.float32)` return x in float64 (other
      arguments of `.to`, a device say, still apply);
    - any function given x first and `dtype=torch.float32` (`softmax(x, -1, dtype=torch.float32)`,
      `x.sum(dtype=torch.float32)`) runs without that dtype, in float64;
    - a matrix product of float64 and float32 operands (a float64 buffer kept by the rules above
      times a value cast from integers) runs in float64.

    Tensors of other dtypes are untouched: bf16 / fp16 / float32 models behave exactly as without it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args) \
                and {args[0].dtype, args[1].dtype} == {torch.float32, torch.float64}:
            args = tuple(a.double() for a in args)
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if func is torch.Tensor.float:
                return args[0]
            if func in (torch.Tensor.to, torch.Tensor.type) and _dtype_arg(args, kwargs) == torch.float32:
                args = tuple(a for a in args if not isinstance(a, torch.dtype))
                kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
                if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                    return args[0]
            elif kwargs.get("dtype") == torch.float32:
                kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        return func(*args, **kwargs)
