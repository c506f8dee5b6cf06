"""Training engines: orchestrate chunked forward/backward passes with torch autograd."""
from .adjoint import AdjointOutput, AdjointSharding

__all__ = ["AdjointOutput", "AdjointSharding"]
