"""Integrations with training frameworks: the Hugging Face Trainer (seqwrap/hf/trainer.py), TRL's SFTTrainer
(seqwrap/hf/trl.py) and DPOTrainer (seqwrap/hf/dpo.py); the TRL ones are imported on first use (they need trl)."""
from ..hf.trainer import SeqwrapTrainer, SeqwrapTrainerMixin

__all__ = ["SeqwrapDPOTrainer", "SeqwrapSFTTrainer", "SeqwrapTrainer", "SeqwrapTrainerMixin"]


def __getattr__(name):
    if name == "SeqwrapSFTTrainer":
        from ..hf.trl import SeqwrapSFTTrainer

        return SeqwrapSFTTrainer
    if name == "SeqwrapDPOTrainer":
        from ..hf.dpo import SeqwrapDPOTrainer

        return SeqwrapDPOTrainer
    raise AttributeError(f"module 'seqwrap.integrations' has no attribute {name!r}")
