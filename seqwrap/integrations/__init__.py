"""Integrations with training frameworks (Hugging Face Trainer)."""
from .trainer import SeqwrapTrainer, SeqwrapTrainerMixin

__all__ = ["SeqwrapTrainer", "SeqwrapTrainerMixin"]
