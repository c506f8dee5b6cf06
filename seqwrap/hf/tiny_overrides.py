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

    # -- defaults that do not build a model (None where the modeling code needs a value) ----------------
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "deepseek_v2": dict(n_group=2, topk_group=1, num_experts_per_tok=2),
    "lfm2_moe": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16,
                           indexer_compress_ratio=4),
    "xmod": dict(default_language="en_XX"),
    # -- layer layouts the generic selection cannot express ----------------------------------------------
    # GPT-Neo: attention_types [[kinds, repeat]] expands to attention_layers
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2),
    # Zamba: one attention block shared (tied) by every "hybrid" layer: two of them, so the tie has a partner
    "zamba": dict(num_hidden_layers=4, mamba_dt_rank=8, attention_hidden_size=128, attention_head_dim=32,
                  layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"]),
    # Dory: input, looped (recurrent) and output layers; its to_dict writes each layer as an (attention, mlp)
    # pair and doubles the counts, and __post_init__ halves them again: these are the doubled values
    "dory": dict(num_hidden_layers=6, layer_types=["sliding_attention", "mlp", "sliding_attention", "mlp",
                                                   "full_attention", "mlp"],
                 n_input_layers=2, n_recurrent_layers=2, n_output_layers=2),
    # Gemma-3n: the last num_kv_shared_layers reuse the K/V of earlier layers of the same type
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         activation_sparsity_pattern=[0.0] * 4, num_kv_shared_layers=2),
    # Falcon-H1: the Mamba heads must fill mamba_d_ssm
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1),
    # HRM: two stacks of num_layers_per_stack layers
    "hrm_text": dict(num_layers_per_stack=1),
    # Reformer: axial position shape multiplies to the (training) sequence length, chunked attentions
    "reformer": dict(axial_pos_shape=[5, 8], axial_pos_embds_dim=[32, 32], lsh_attn_chunk_length=8,
                     local_attn_chunk_length=8, num_buckets=4, num_hashes=1, attn_layers=["local", "lsh"]),
    # Kolibri 1.1 (transformers >= 5.25): its key indexer scores with at most the query heads of one key head
    "kolibri1_1": dict(index_num_heads=2),
}
