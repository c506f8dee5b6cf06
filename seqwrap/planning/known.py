"""Configs the planner knows by name, so that `--config llama-3.1-8b` works offline.

Each is the decoder part of the published config.json (the fields the memory model reads, plus the
position limit and dtype); the parameter count of DecoderShape.from_config on it is the published one.
"""
from __future__ import annotations

KNOWN_CONFIGS = {
    # meta-llama/Llama-3.1-8B config.json (8_030_261_248 parameters)
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}


def known_config(name: str) -> dict | None:
    """The embedded config called `name` (case-insensitive; "meta-llama/Llama-3.1-8B" works too), or None."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    return KNOWN_CONFIGS.get(key)
