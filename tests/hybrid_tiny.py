"""Tiny random SSM / hybrid Hugging Face causal LMs built from configs (no download).

HF's recurrent mixers cast to float32 inside (the chunked SSD scan, the gated DeltaNet, every RMSNorm,
A = -exp(A_log.float())), even in a float64 model, so their float64 results carry float32 rounding
that depends on how the sequence is cut. `pure_float64()` (seqwrap/hf/float64.py, re-exported here)
makes those casts no-ops for float64 tensors: the model then computes in float64 throughout, and a
chunked step can be compared with full backprop of the same code at float64 precision.
"""
from __future__ import annotations

import torch

from seqwrap.hf.float64 import pure_float64  # noqa: F401  (the tests import it from here)

VOCAB = 61

# family -> (config class, model class, config kwargs); hidden 32 everywhere
FAMILIES = {
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2, chunk_size=8, conv_kernel=4,
        num_hidden_layers=2)),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
        mamba_expand=2, mamba_chunk_size=8, max_position_embeddings=256)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        layers_block_type=["mamba", "attention", "mlp", "mamba"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
        expand=2, chunk_size=8, max_position_embeddings=256)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, shared_intermediate_size=40, num_local_experts=4,
        num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
        mamba_expand=2, mamba_chunk_size=8, max_position_embeddings=256, logits_scaling=2.0,
        embedding_multiplier=1.5, residual_multiplier=0.7, attention_multiplier=0.3,
        position_embedding_type="rope")),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, mamba_d_state=8, n_mamba_heads=4, mamba_ngroups=2,
        mamba_expand=2, chunk_size=8, num_mem_blocks=1, use_mem_rope=True, max_position_embeddings=256)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        max_position_embeddings=256)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(
        state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2, mamba_d_conv=4, max_position_embeddings=256)),
}


def tiny_hybrid(family: str, dtype=torch.float64, seed: int = 0, **extra):
    import transformers

    cfg_name, model_name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    # MoE experts: the eager loop (torch's grouped_mm has no float64)
    config = getattr(transformers, cfg_name)(vocab_size=VOCAB, hidden_size=32, experts_implementation="eager",
                                             **{**kw, **extra})
    model = getattr(transformers, model_name)(config).to(dtype)
    with torch.no_grad():  # some families initialise norms/biases to constants: make every weight random
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
