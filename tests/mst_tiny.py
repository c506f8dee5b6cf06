"""Tiny random Hugging Face decoder LMs (2 layers, hidden 32, vocab 128) for the MsT tests (tests/hf_tiny.py serves the engines).

Also a float64-faithful copy of transformers' ForCausalLMLoss: the original casts the
logits to float32 first, which would hide float64 differences behind float32 rounding.
"""
import copy

import torch
import torch.nn.functional as F

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, attn_implementation="eager",
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
LORA_TARGETS = {"phi3": ["qkv_proj", "gate_up_proj", "down_proj"]}
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if family == "gemma2":  # softcap small enough that tanh really bends the logits
        return tf.Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                               final_logit_softcapping=2.0, attn_logit_softcapping=20.0)
    if family == "phi3":
        return tf.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


def tiny_model(family: str, *, seed: int = 0, dtype=torch.float64, lora: bool = False):
    """A random *ForCausalLM (or a peft LoRA PeftModel around one with random, non-zero adapters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                         target_modules=LORA_TARGETS.get(family, DEFAULT_LORA_TARGETS))
        model = get_peft_model(model, cfg)
        model.to(dtype)
    return model


def pair(family: str, **kw):
    """(reference, twin): two identical models; the reference computes its loss in float64."""
    ref = tiny_model(family, **kw)
    twin = copy.deepcopy(ref)
    inner = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    inner.loss_function = causal_lm_loss_exact
    return ref, twin


def causal_lm_loss_exact(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                         shift_labels=None, **kwargs):
    """transformers.loss.loss_utils.ForCausalLMLoss without the float32 upcast."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


def batch(length: int = 13, *, seed: int = 1):
    """Two rows; row 1 right-padded by 3 tokens (mask 0, labels -100), plus one more ignored label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[1, -3:] = -100
    labels[0, 4] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def grads(model):
    """{name: grad} of every parameter that requires grad (names without peft/DDP prefixes kept as is)."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def max_rel_error(ref: dict, got: dict) -> float:
    """max over tensors of max|ref - got| / max|ref|; every reference gradient must exist."""
    worst = 0.0
    assert ref.keys() == got.keys()
    for name, r in ref.items():
        g = got[name]
        assert r is not None and g is not None, name
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (r - g).abs().max().item() / scale)
    return worst
