"""Tiny random causal LMs of the families issue 19 found broken, and SeCO against full backprop in float64.

Each model is built from its config class (random weights, no download), in eval mode (no dropout),
float64; `compare` runs HF's own forward + loss.backward() (the reference, loss as HF computes it,
auxiliary terms included) and a seqwrap engine step on the same model, both inside `pure_float64()`
(seqwrap/hf/float64.py), which makes HF's internal float32 casts no-ops for float64 tensors (casts,
and reductions / softmaxes asked for `dtype=torch.float32`).
"""
from __future__ import annotations

import torch
import transformers

import seqwrap

from seqwrap.hf.float64 import pure_float64

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, head_dim=8, pad_token_id=0, eos_token_id=1,
             bos_token_id=2)

def build(model_type: str, seed: int = 0, attn: str = "sdpa", **overrides):
    """A tiny float64 *ForCausalLM of `model_type` in eval mode; every weight perturbed (no constant norms)."""
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def batch(B: int = 2, T: int = 24, seed: int = 1, pad: int = 0):
    """ids (B, T) and a padding mask (B, T) with `pad` right-padded tokens in row 1 (None if pad is 0). Right
    padding: no query sees only padded keys (HF's eager paths give such rows a length-dependent mean)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    if not pad:
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -pad:] = 0
    return ids, mask


def labels_of(ids, mask):
    """Labels as a collator makes them: the ids, -100 at padding (a padded query that sees no key at all
    gets whatever the attention makes of an all-masked row, which depends on the row's length in HF's
    eager paths: such positions must not count)."""
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


def reference(model, ids, mask=None):
    """(HF's loss, {name: grad}) of full backprop."""
    model.zero_grad(set_to_none=True)
    with pure_float64():
        loss = model(ids, labels=labels_of(ids, mask), attention_mask=mask).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def engine_step(model, ids, mask=None, engine=seqwrap.SeCO, chunk_size: int = 7, **options):
    """(the engine's StepResult, {name: grad}) of one step from zero gradients."""
    model.zero_grad(set_to_none=True)
    with pure_float64():
        out = engine(model, chunk_size=chunk_size, **options)(ids, labels=labels_of(ids, mask), attention_mask=mask)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def worst_error(grads, ref) -> tuple[float, str]:
    """(largest relative Frobenius error, its parameter name); a parameter that one side reached and the
    other did not counts as error 1."""
    worst, where = 0.0, ""
    for name in set(grads) | set(ref):
        if name not in grads or name not in ref:
            err = 1.0
        else:
            denom = ref[name].norm().item() or 1.0
            err = (grads[name] - ref[name]).norm().item() / denom
        if err > worst:
            worst, where = err, name
    return worst, where


def compare(model, ids, mask=None, **options):
    """Runs both and returns (loss difference, worst relative gradient error, its parameter)."""
    loss, ref = reference(model, ids, mask)
    out, grads = engine_step(model, ids, mask, **options)
    worst, where = worst_error(grads, ref)
    return abs(out.loss.item() - loss.item()), worst, where
