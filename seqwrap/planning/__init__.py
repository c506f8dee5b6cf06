"""The memory planner: seqwrap.plan(model_or_config, seq_len, device_memory=..., ...).

  planner.py  plan() and Plan: which setting and chunk size fit, from memory_model.seco_peak
  source.py   what is trained: a model, a config, a config.json, a known name, a cached hub id
  known.py    configs known by name (llama-3.1-8b), for offline use
  budget.py   free memory of a CUDA device, available memory of this machine
  units.py    "80GB" / "24GiB" / "128K" / "1M"
  table.py    a plan as a text table
  cli.py      `python -m seqwrap plan`
  auto.py     chunk_size="auto" of the engines: the plan at the first step
"""
from .auto import AutoChunk, AutoChunkNotice
from .planner import Plan, PlanError, plan
from .units import format_bytes, parse_bytes, parse_tokens

__all__ = ["AutoChunk", "AutoChunkNotice", "Plan", "PlanError", "plan", "parse_bytes", "parse_tokens", "format_bytes"]
