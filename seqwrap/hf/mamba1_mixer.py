"""Mamba-1 mixers (HF MambaMixer, JambaMambaMixer) for the chunked engines.

Why a re-implementation: in transformers' multi-token cached forward these mixers run
`mamba_selective_scan` from a zero state and ignore the cached SSM state (only the single-token
path reads it), so a chunk cannot continue the previous one through HF's own forward. During a
chunked step each such mixer instance runs `mamba1_forward` instead: HF's forward (transformers
5.15-5.25; the cache calls go through the same HybridChunkCache as every other mixer) with the scan
replaced by seqwrap's selective scan (C/CUDA core), started from the cached state and returning the
final one. The parameters are the HF modules' own (LoRA layers inside in_proj / x_proj / out_proj
work unchanged). `patched(model)` installs it on the instances and restores them exactly.

Casts: HF computes discrete B * u in float32 and rounds the state to the input dtype before C; here
the whole scan runs in float32 (float64 for float64 models), which is the same for float32 / float64
models and more precise for half-precision ones.

Shapes: hidden (B, L, hidden); conv input (B, d_inner, L); SSM state (B, d_inner, d_state).
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..ops.selective_scan import selective_scan
from .hybrid_cache import recurrent_state

MIXERS = ("MambaMixer", "JambaMambaMixer")


def _masked(x, mask):
    """HF's apply_mask_to_padding_states: zeroes padded positions (mask (B, L), x (B, L, ...))."""
    return x if mask is None else (x * mask[:, :, None]).to(x.dtype)


def mamba1_forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    """HF Mamba / Jamba mixer forward with a scan that continues the cached state. Returns (B, L, hidden)."""
    cache = cache if cache is not None else cache_params
    seq_len, dtype = hidden_states.shape[1], hidden_states.dtype
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > seq_len:
        # HF Mamba hands its mixers the decoder's mask as it is: the engines pass the mask of every position
        # up to the chunk's end (the attention layers of hybrid models need the past keys'): this chunk's part
        attention_mask = attention_mask[:, -seq_len:]
    h0 = recurrent_state(cache, self.layer_idx) if cache is not None else None
    hidden_states = _masked(hidden_states, attention_mask)
    x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)     # (B, d_inner, L) each
    A = -torch.exp(self.A_log.float())                                          # (d_inner, d_state)
    if cache is not None:  # [conv state ; x]: the first outputs see the previous chunk's inputs
        x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    w = self.conv1d.weight                                                      # (d_inner, 1, k)
    u = F.conv1d(x.to(w.dtype), w, self.conv1d.bias, padding=w.shape[-1] - 1, groups=w.shape[0])[..., :x.shape[-1]]
    u = self.act(u).to(dtype)[..., -seq_len:]
    u = _masked(u.transpose(1, 2), attention_mask)                              # (B, L, d_inner)
    ts, B, C = torch.split(self.x_proj(u), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
    if hasattr(self, "dt_layernorm"):  # Jamba: norms on dt, B and C
        ts, B, C = self.dt_layernorm(ts), self.b_layernorm(B), self.c_layernorm(C)
    ts = self.dt_proj.weight @ ts.transpose(1, 2)                               # (B, d_inner, L)
    bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    dt = ts if bias is None else ts + bias.to(ts.dtype)[..., None]
    dt = F.softplus(dt)
    io = torch.float64 if dtype == torch.float64 else torch.float32
    y, h_end = selective_scan(u.transpose(1, 2).to(io), dt.to(io), A, B.transpose(1, 2).to(io),
                              C.transpose(1, 2).to(io), self.D.float(), gate.to(io), h0, return_final_state=True)
    if cache is not None:
        cache.update_recurrent_state(h_end, self.layer_idx)
    return self.out_proj(y.transpose(1, 2).to(dtype))


def mixers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ in MIXERS]


@contextmanager
def patched(model):
    """Within the block every Mamba-1 mixer of `model` runs mamba1_forward; afterwards the instances are as
    they were (the instance attribute removed, or a previous one put back)."""
    saved = []
    try:
        for m in mixers(model):
            saved.append((m, m.__dict__.get("forward")))
            m.forward = types.MethodType(mamba1_forward, m)
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
