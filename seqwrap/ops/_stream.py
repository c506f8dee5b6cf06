"""The CUDA stream handle a C launcher should use for a tensor: torch's current one."""
import torch


def stream_for(t: torch.Tensor) -> int:
    """torch.cuda.current_stream(device).cuda_stream for CUDA tensors, 0 otherwise."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0
