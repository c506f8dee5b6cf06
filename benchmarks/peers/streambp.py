"""A re-implementation of StreamBP (Luo et al. 2025, "StreamBP: Memory-Efficient Exact Backpropagation for
Long Sequence Training of LLMs") for Llama-style HF models: a peer baseline for bench_seco.py, written here
from the paper's algorithm (not the authors' code; no package of it is installed).

The algorithm, per step:
  1. forward without grad through the whole sequence, keeping every decoder layer's input (L+1 tensors
     of (B, T, H): the memory that grows with T);
  2. LM head + loss chunk by chunk along the sequence: each chunk's logits (B, c, V) are formed, its loss
     backpropagated at once; the gradient on the last hidden state is collected (B, T, H);
  3. layers from the last to the first: the layer's K/V over the whole sequence are formed once (with
     grad, then detached); the layer is replayed query-chunk by query-chunk against K/V[:end of chunk],
     each chunk backpropagated with its slice of the upstream gradient; the K/V (and normed input)
     gradients summed over chunks are then backpropagated once through the K/V projections and the norm.
Exact: the loss is normalised by the step's count of labels (the global one), so the gradients are those
of full backprop (checked against it in float64 by `check_exact`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def _heads(x, n, d):
    """(B, T, n*d) -> (B, n, T, d)."""
    return x.view(*x.shape[:2], n, d).transpose(1, 2)


def _layer_backward(layer, x_in, cos, sin, grad_out, chunk):
    """Backward of one decoder layer, streamed over query chunks. x_in (B, T, H) the layer's input,
    grad_out (B, T, H) dL/d(layer output). Parameter grads accumulate; returns dL/dx_in (B, T, H)."""
    att = layer.self_attn
    d, nq, nkv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads
    T = x_in.shape[1]
    x = x_in.detach().requires_grad_()
    hn = layer.input_layernorm(x)                                   # (B, T, H)
    k = _heads(att.k_proj(hn), nkv, d)                              # (B, nkv, T, d)
    v = _heads(att.v_proj(hn), nkv, d)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    hn_d, k_d, v_d = (t.detach().requires_grad_() for t in (hn, k, v))
    rep = nq // nkv
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        q = _heads(att.q_proj(hn_d[:, s:e]), nq, d)                  # (B, nq, c, d)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, s:e], sin[:, s:e])
        kk = k_d[:, :, :e].repeat_interleave(rep, dim=1)
        vv = v_d[:, :, :e].repeat_interleave(rep, dim=1)
        causal = torch.ones(e - s, e, dtype=torch.bool, device=x.device).tril(diagonal=s)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=att.scaling)
        h1 = x[:, s:e] + att.o_proj(o.transpose(1, 2).reshape(*o.shape[:1], e - s, -1))
        out = h1 + layer.mlp(layer.post_attention_layernorm(h1))
        torch.autograd.backward(out, grad_out[:, s:e])
    torch.autograd.backward([hn, k, v], [hn_d.grad, k_d.grad, v_d.grad])
    return x.grad


def streambp_backward(model, ids: torch.Tensor, chunk: int, ignore_index: int = -100) -> torch.Tensor:
    """One StreamBP forward+backward of `model` (a LlamaForCausalLM) on ids (B, T) with labels = ids;
    parameter .grad accumulates as model(ids, labels=ids).loss.backward() would. Returns the loss."""
    lm = model.model
    B, T = ids.shape
    shift = F.pad(ids[:, 1:], (0, 1), value=ignore_index)
    norm = max(int((shift != ignore_index).sum()), 1)
    pos = torch.arange(T, device=ids.device).unsqueeze(0)
    with torch.no_grad():  # 1. forward, keeping each layer's input
        h = lm.embed_tokens(ids)
        cos, sin = lm.rotary_emb(h, pos)
        inputs = [h]
        for layer in lm.layers:
            h = layer(h, position_embeddings=(cos, sin), attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
            inputs.append(h)
    # 2. LM head + loss, chunk by chunk
    last = inputs.pop().detach()
    grad = torch.zeros_like(last)
    total = 0.0
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        x = last[:, s:e].detach().requires_grad_()
        logits = model.lm_head(lm.norm(x)).float()                  # (B, c, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift[:, s:e].reshape(-1),
                               ignore_index=ignore_index, reduction="sum") / norm
        loss.backward()
        grad[:, s:e] = x.grad
        total += float(loss.detach())
        del logits, loss, x
    del last
    # 3. layers, last to first
    for layer in reversed(lm.layers):
        grad = _layer_backward(layer, inputs.pop(), cos, sin, grad, chunk)
    emb = lm.embed_tokens(ids)
    emb.backward(grad)
    return torch.tensor(total)


def check_exact(tol: float = 1e-6) -> float:
    """StreamBP's gradients against full backprop on a tiny float64 Llama; returns the worst relative error
    (raises when above tol, so the benchmark never compares against a wrong baseline). HF's LlamaRMSNorm
    computes in float32 inside, so float64 agreement is ~1e-7, not 1e-12; a wrong gradient is off by far more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 97, (2, 23))
    logits = model(ids).logits
    shift = F.pad(ids[:, 1:], (0, 1), value=-100)
    (F.cross_entropy(logits.reshape(-1, 97), shift.reshape(-1), reduction="sum") / (shift != -100).sum()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    streambp_backward(model, ids, chunk=7)
    worst = max(((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in model.named_parameters())
    if not worst <= tol:
        raise AssertionError(f"StreamBP re-implementation is not exact: relative error {worst:.3g}")
    return worst


if __name__ == "__main__":
    print(check_exact())
