"""Integrations with training frameworks: the Hugging Face Trainer (seqwrap/hf/trainer.py) and TRL's
SFTTrainer (seqwrap/hf/trl.py; imported on first use, it needs trl)."""
from ..hf.trainer import SeqwrapTrainer, SeqwrapTrainerMixin

__all__ = ["SeqwrapSFTTrainer", "SeqwrapTrainer", "SeqwrapTrainerMixin"]


def __getattr__(name):
    if name == "SeqwrapSFTTrainer":
        from ..hf.trl import SeqwrapSFTTrainer

        return SeqwrapSFTTrainer
    raise AttributeError(f"module 'seqwrap.integrations' has no attribute {name!r}")
