"""Mamba-2 mixers (Mamba2Mixer, BambaMixer, NemotronHMamba2Mixer, GraniteMoeHybridMambaLayer,
Zamba2MambaMixer: the same forward in transformers 5.24) on seqwrap's SSD scan, for the chunked engines.

Why a re-implementation: HF's mixers continue a sequence correctly through the cache (hybrid.py), but
without mamba_ssm their SSD runs `mamba2_chunk_scan` in torch, which materialises per head and SSD
chunk (256 tokens) the (chunk x chunk) decay, score and masked-score tensors in float32 and keeps them
for backward: about 5 x 256 floats per token and head, 20-40x the layer's own activations, and the
largest term of a chunked step's memory. During a chunked step each such mixer instance runs
`mamba2_forward` instead: HF's forward with that scan replaced by seqwrap.ops.ssd_scan (C/CUDA core;
O(heads x headdim) per token plus state checkpoints), started from the cached state and returning the
final one. Parameters, casts and the gated norm are HF's own (LoRA layers in in_proj / out_proj work
unchanged). `patched(model)` installs it on the instances and restores them exactly.

The same recurrence computed another way: equal to HF's result to float32 rounding (float32 models)
or to float64 rounding (float64 computation; tests/test_hybrid.py).

Shapes: hidden (B, L, hidden); conv input (B, conv_dim, L); SSM state (B, heads, headdim, dstate).
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..ops.ssd_scan import ssd_scan
from .hybrid_cache import recurrent_state
from .mamba2_ulysses import STATE_ATTR, mamba2_ulysses_forward

MIXERS = ("Mamba2Mixer", "BambaMixer", "NemotronHMamba2Mixer", "GraniteMoeHybridMambaLayer", "Zamba2MambaMixer")


def _masked(x, mask):
    """HF's apply_mask_to_padding_states: zeroes padded positions (mask (B, L), x (B, L, ...))."""
    return x if mask is None else (x * mask[:, :, None]).to(x.dtype)


def mamba2_forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    """HF's Mamba-2 mixer forward (multi-token path) with seqwrap's SSD scan. Returns (B, L, hidden)."""
    if getattr(self, STATE_ATTR, None) is not None:  # split over heads under Ulysses (mamba2_ulysses.py)
        return mamba2_ulysses_forward(self, hidden_states, cache=cache, attention_mask=attention_mask,
                                      cache_params=cache_params, **kwargs)
    cache = cache if cache is not None else cache_params
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
    h0 = recurrent_state(cache, self.layer_idx) if cache is not None else None
    proj = self.in_proj(_masked(hidden_states, attention_mask))
    A = -torch.exp(self.A_log.float())                                                     # (heads,)
    gate, xbc, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xbc = xbc.transpose(1, 2)                                                              # (B, conv_dim, L)
    if cache is not None:  # [conv state ; xbc]: the first outputs see the previous chunk's inputs
        xbc = cache.update_conv_state(xbc, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    w = self.conv1d.weight                                                                 # (conv_dim, 1, k)
    out = F.conv1d(xbc.to(w.dtype), w, self.conv1d.bias, padding=w.shape[-1] - 1, groups=w.shape[0])
    xbc = self.act(out[..., :xbc.shape[-1]]).to(xbc.dtype)[..., -seq_len:]
    xbc = _masked(xbc.transpose(1, 2), attention_mask)                                     # (B, L, conv_dim)
    x, B, C = torch.split(xbc, [self.intermediate_size, G * N, G * N], dim=-1)
    dt = F.softplus(dt + self.dt_bias.to(dt.dtype))                                        # (B, L, heads)
    lo, hi = self.time_step_limit
    dt = torch.clamp(dt, min=lo, max=hi)
    io = torch.float64 if dtype == torch.float64 else torch.float32   # HF's SSD computes in float32
    y, h_end = ssd_scan(x.reshape(batch, seq_len, H, P).to(io), dt.to(io), A, B.reshape(batch, seq_len, G, N).to(io),
                        C.reshape(batch, seq_len, G, N).to(io), self.D, None, h0, return_final_state=True)
    if cache is not None:
        cache.update_recurrent_state(h_end, layer_idx=self.layer_idx)
    y = self.norm(y.reshape(batch, seq_len, -1), gate)
    return self.out_proj(y.to(dtype))


def mixers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in MIXERS]


@contextmanager
def patched(model):
    """Within the block every Mamba-2 mixer of `model` runs mamba2_forward; afterwards the instances are as
    they were (the instance attribute removed, or a previous one put back)."""
    saved = []
    try:
        for m in mixers(model):
            saved.append((m, m.__dict__.get("forward")))
            m.forward = types.MethodType(mamba2_forward, m)
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
