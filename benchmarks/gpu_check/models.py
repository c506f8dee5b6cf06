"""Random-weight Llama models from configs (no download) for the engine sections, and LoRA on them."""
from __future__ import annotations

import torch

# name -> LlamaConfig fields. "1b" follows Llama-3.2-1B's published shape (16 layers, hidden 2048,
# 32 / 8 heads of 64, intermediate 8192, vocab 128256, tied embeddings): 1.24e9 parameters.
CONFIGS = {
    "toy": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               tie_word_embeddings=True),
}


def llama_config(name: str, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=max(max_len, 2048), **CONFIGS[name])


def build_llama(config, device: str, dtype: torch.dtype, seed: int = 0):
    """Initialised on the device itself (a 1B model initialises in a second there, not in a minute on
    the CPU), then cast; training mode; sdpa attention for the HF baseline."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.config.use_cache = False
    model.train()
    return model


def add_lora(model, rank: int = 16):
    """peft LoRA (rank r, alpha 2r) on the attention projections; adapters initialised non-zero so that
    every adapter gets a gradient (peft's default B = 0 would leave the A gradients zero)."""
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def enable_checkpointing(model) -> None:
    """HF gradient checkpointing, non-reentrant (works with frozen inputs under LoRA)."""
    import seqwrap

    seqwrap.hf.enable_checkpointing(model, use_reentrant=False)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count(params) -> int:
    return sum(p.numel() for p in params)
