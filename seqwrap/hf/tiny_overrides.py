"""Per-family config values for the tiny twins (tiny.py), where the generic rules are not enough.

model_type -> config fields set after the generic shrink (they win). Each entry says why. The hybrid
and SSM entries are the shapes tests/hybrid_tiny.py has used since those families were added
(hidden 32: the Mamba-2 mixers need heads x head_dim = expand x hidden).
"""
from __future__ import annotations

OVERRIDES: dict[str, dict] = {
    # -- SSM / hybrid: the mixer's sizes must agree with each other ---------------------------------
    "mamba2": dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2, chunk_size=8,
                   conv_kernel=4, num_hidden_layers=2),
    "bamba": dict(hidden_size=32, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
                  mamba_d_state=8, mamba_expand=2, mamba_chunk_size=8),
    "nemotron_h": dict(hidden_size=32, layers_block_type=["mamba", "attention", "mlp", "mamba"],
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                       ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, expand=2, chunk_size=8),
    "granitemoehybrid": dict(hidden_size=32, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                             shared_intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                             mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
                             mamba_chunk_size=8, position_embedding_type="rope"),
    "zamba2": dict(hidden_size=32, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=48, mamba_d_state=8,
                   n_mamba_heads=4, mamba_ngroups=2, mamba_expand=2, chunk_size=8, num_mem_blocks=1,
                   use_mem_rope=True, hybrid_layer_ids=[1, 3], mamba_headdim=16, attention_head_dim=8),
    "qwen3_next": dict(hidden_size=32, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                       linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "mamba": dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4),
    "falcon_mamba": dict(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                         time_step_rank=4),
    "jamba": dict(hidden_size=32, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_experts_per_tok=1,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_state=8,
                  mamba_dt_rank=4, mamba_expand=2, mamba_d_conv=4),
}
