"""Census entries beyond the families' defaults: a family with a setting its default config leaves off.

name -> (model_type, config kwargs on top of the config class's defaults). A variant exists when the
setting changes what seqwrap must get right (a length-dependent rotary scaling, an auxiliary loss term).
"""
from __future__ import annotations

# Phi-3-mini-128k's LongRoPE: short factors up to original_max_position_embeddings, long ones past it
# (48 = head_dim 96 / 2; the twin resamples them to its own rotary size)
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4096,
                 short_factor=[1.0 + 0.02 * i for i in range(48)], long_factor=[1.5 + 0.5 * i for i in range(48)])

VARIANTS: dict[str, tuple[str, dict]] = {
    "phi3[longrope]": ("phi3", dict(rope_parameters=_LONGROPE, max_position_embeddings=131072,
                                    original_max_position_embeddings=4096)),
    "llama[llama3-rope]": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=8192),
                                         max_position_embeddings=131072)),
    "qwen2[yarn]": ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                                       original_max_position_embeddings=32768),
                                  max_position_embeddings=131072)),
    # BertLMHeadModel with is_decoder=False (its default) attends both ways: not causal, cannot be chunked
    "bert[bidirectional]": ("bert", dict(is_decoder=False)),
    # the router's load-balancing loss is part of HF's loss when output_router_logits=True
    "mixtral[router-aux]": ("mixtral", dict(output_router_logits=True)),
    "qwen3_moe[router-aux]": ("qwen3_moe", dict(output_router_logits=True)),
}
