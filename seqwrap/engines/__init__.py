"""Training engines: orchestrate chunked forward/backward passes with torch autograd.

SeCO / SpaCO (HF decoder LMs) and AdjointSharding (HF Mamba)."""
from .adjoint import AdjointOutput, AdjointSharding
from .seco import SeCO, StepResult
from .spaco import SpaCO, proportional_to_labels

__all__ = ["AdjointOutput", "AdjointSharding", "SeCO", "SpaCO", "StepResult", "proportional_to_labels"]
