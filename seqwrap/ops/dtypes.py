"""The accumulation ("real") dtype of a computation, one rule for the whole package."""
import torch


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
