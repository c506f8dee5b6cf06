"""The boundary to Hugging Face: the only seqwrap package that touches transformers (and peft).

  versions.py       supported version ranges, checked when a model is adapted or patched
  compat.py         what differs between supported transformers versions, resolved once per model;
                    its docstring lists every transformers internal seqwrap relies on
  decoder.py        HFDecoderAdapter: a causal LM as the chunked engines see it
  cache.py          the Cache subclass the model sees during a step (a view of the engine's store)
  attention.py      seqwrap's entries in transformers' attention registry
  checkpointing.py  gradient checkpointing that keeps the chunk cache
  ulysses.py        apply_ulysses / remove_ulysses
  minisequence.py, mst_lm.py, mst_mlp.py   MsT patches (apply_minisequence / remove_minisequence)
  mamba.py          MambaAdapter for AdjointSharding
  hybrid.py         which SSM / hybrid families the chunked engines drive, and why others are refused;
                    hybrid_cache.py (the recurrent-state cache view), mamba1_mixer.py / mamba2_mixer.py
                    (seqwrap's mixer forwards during a chunked step)
  float64.py        pure_float64(): HF's internal float32 casts become no-ops for float64 tensors
  tiny.py           tiny random-weight twins of a config (generic shrinker; tiny_overrides.py per family)
  verify.py         seqwrap.verify: a chunked step on the twin against its full backprop (verify_report.py)
  census.py         the family census over transformers' causal-LM auto mapping (python -m seqwrap.hf.census)
  trainer.py        SeqwrapTrainer (imported on first use: it imports transformers.Trainer)

transformers itself is imported lazily: importing seqwrap never needs it.
"""
from .compat import UnsupportedModelError, disable_checkpointing, enable_checkpointing
from .minisequence import apply_minisequence, is_minisequence_applied, remove_minisequence
from .verify import verify
from .versions import SUPPORTED, UnsupportedVersionError

__all__ = ["SUPPORTED", "UnsupportedModelError", "disable_checkpointing", "enable_checkpointing", "UnsupportedVersionError", "apply_minisequence",
           "is_minisequence_applied", "remove_minisequence", "verify"]
