"""Integrations with training frameworks (Hugging Face Trainer); the glue lives in seqwrap/hf/trainer.py."""
from ..hf.trainer import SeqwrapTrainer, SeqwrapTrainerMixin

__all__ = ["SeqwrapTrainer", "SeqwrapTrainerMixin"]
