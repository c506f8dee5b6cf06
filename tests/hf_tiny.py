"""Tiny random Hugging Face causal LMs built from configs (no download), and the exact reference."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

VOCAB = 61

# family -> (config class name, model class name, extra config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 6, "head_dim": 8,
                                                      "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}),
}


def tiny_model(family: str = "llama", dtype=torch.float64, layers: int = 2, seed: int = 0, pure64: bool = False,
               **extra):
    """pure64: Llama-style RMSNorms compute in float32 inside (forward and backward), which makes the
    backward slightly non-linear in its upstream gradient (float32 rounding); tests that rescale
    gradients (SpaCO's expectations) swap in the same norm computed in the model's dtype."""
    import transformers

    cfg_name, model_name, kw = FAMILIES[family]
    kw = {**kw, **extra}
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    model = getattr(transformers, model_name)(config).to(dtype)
    if family == "gemma2" and dtype == torch.float64:
        # Gemma2's eager attention runs its softmax in float32 (rounding depends on the row
        # length): swap in the same attention with the softmax in the model's dtype.
        # Its RMSNorm also multiplies by (1 + weight) in float32, so the weight gradient is a
        # float32 sum over tokens: give those norms a float64 forward too.
        _register_eager_f64()
        model.set_attn_implementation("eager_f64")
        for mod in model.modules():
            if type(mod).__name__ == "Gemma2RMSNorm":
                mod.forward = types.MethodType(_gemma_rmsnorm_f64, mod)
    if pure64:
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon"):
                mod.forward = types.MethodType(_llama_rmsnorm_f64, mod)
    with torch.no_grad():  # some families initialise norms/biases to constants: make every weight random
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def reference(model, ids, labels=None, attention_mask=None, num_items=None):
    """Full backprop in the model's dtype: (loss, {name: grad}).

    HF's own loss upcasts logits with .float() (a downcast for float64 models), so the
    float64 reference forms the same loss from the model's logits without that cast.
    """
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=attention_mask).logits
    labels = ids if labels is None else labels
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction="sum")
    loss = total / (num_items if num_items is not None else (shift != -100).sum())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def max_rel_err(model, grads):
    """Largest relative error (Frobenius) of model's .grad against grads, over all parameters."""
    worst = 0.0
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == set(grads), f"gradients on different parameters: {sorted(names ^ set(grads))}"
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        ref = grads[n]
        denom = ref.norm().item() or 1.0
        worst = max(worst, (p.grad - ref).norm().item() / denom)
    return worst


def _eager_f64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Gemma2's eager attention, softmax in the input dtype. query (B, H, L, D); key/value (B, Hkv, S, D)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_eager_f64():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("eager_f64", _eager_f64)
    AttentionMaskInterface.register("eager_f64", eager_mask)


def _gemma_rmsnorm_f64(self, x):
    """Gemma2RMSNorm in the input dtype: x / rms(x) * (1 + weight). x (..., hidden)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _llama_rmsnorm_f64(self, x):
    """LlamaRMSNorm in the input dtype: weight * x / rms(x). x (..., hidden)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def perturb_with_sinks(model, rmsnorm_class: str | None = None):
    """Makes every weight random (attention sinks at scale 1, the rest 0.02, so the sinks matter) and, with
    rmsnorm_class, gives those RMSNorms a forward in the model's dtype (HF computes them in float32)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("sinks") else 0.02))
    if rmsnorm_class is not None:
        for mod in model.modules():
            if type(mod).__name__ == rmsnorm_class:
                mod.forward = types.MethodType(_llama_rmsnorm_f64, mod)
    return model
