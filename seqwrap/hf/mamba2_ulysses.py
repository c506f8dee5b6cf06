"""HF Mamba-2-family mixers under Ulysses: the forward of one rank's sequence shard, split over heads.

apply_ulysses (ulysses.py) gives every Mamba-2 mixer (mamba2_mixer.MIXERS) a `_seqwrap_ulysses_ssm`
HeadSplit (seqwrap/parallel/ulysses_ssm.py) and this forward. Per call, on rank r of P:

  in_proj of the rank's s tokens                         -> gate (B, s, d_inner), [xBC ; dt] (B, s, conv_dim + H)
  all-to-all (tokens_to_heads)                           -> [xBC ; dt] of the rank's H/P heads (and their B/C
                                                            groups) over all S = P*s tokens
  causal depthwise conv over S tokens on those channels  (continuing the cached conv state of those channels)
  SSD scan of the H/P heads over S tokens                (continuing the cached state of those heads)
  all-to-all back (heads_to_tokens)                      -> y (B, s, d_inner) of the rank's tokens, all heads
  gated RMSNorm with the local gate, out_proj            (as HF: the norm's groups span any head split)

So each rank's cache (seqwrap's HybridChunkCache, during a SeCO / SpaCO step) holds the conv state of
its channels and the SSM state of its heads, and the engine relays their adjoints per rank. The
sequence the ranks concatenate (in rank order) must be the true one: plain Ulysses shards (contiguous
slices, seqwrap.parallel.shard_batch) or, inside SeCO / SpaCO, one chunk's interleaved parts
(shard_batch(..., chunk_size=C)). Casts as mamba2_mixer.mamba2_forward (float32 scan for float32 models).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.ssd_scan import ssd_scan
from ..parallel.ulysses_ssm import HeadSplit, heads_to_tokens, tokens_to_heads
from .hybrid_cache import HybridChunkCache, recurrent_state

STATE_ATTR = "_seqwrap_ulysses_ssm"


def head_split(mixer, group) -> HeadSplit:
    """The HeadSplit of an HF Mamba-2 mixer over `group` (refuses heads or groups that do not split)."""
    return HeadSplit.make(group, mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size,
                          f"the Mamba-2 mixer of layer {mixer.layer_idx} ({type(mixer).__name__})")


def _check_call(self, cache, attention_mask, kwargs):
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("seqwrap.parallel: padding masks are not supported under Ulysses; pack sequences instead")
    if kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
        raise ValueError("seqwrap.parallel: packed rows (seq_idx / cu_seqlens) are not supported by the Mamba-2 "
                         "layers under Ulysses; pass one document per row")
    if cache is not None and not isinstance(cache, HybridChunkCache):
        raise ValueError(f"seqwrap.parallel: under Ulysses the Mamba-2 mixer of layer {self.layer_idx} holds the "
                         "state of its own heads only and cannot continue an HF cache; call the model with "
                         "use_cache=False, or train through seqwrap.SeCO / SpaCO")


def mamba2_ulysses_forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    """hidden_states (B, s, hidden): this rank's tokens. Returns (B, s, hidden)."""
    split: HeadSplit = getattr(self, STATE_ATTR)
    cache = cache if cache is not None else cache_params
    _check_call(self, cache, attention_mask, kwargs)
    batch, _, _ = hidden_states.shape
    dtype = hidden_states.dtype
    hl, gl, Dh, N = split.local_heads, split.local_groups, self.head_dim, self.ssm_state_size
    heads = split.head_slice()
    proj = self.in_proj(hidden_states)
    gate, xbc_dt = proj.split([self.intermediate_size, self.conv_dim + self.num_heads], dim=-1)
    full = tokens_to_heads(xbc_dt, split)                                  # (B, S, conv_r + H/P)
    seq_len = full.shape[1]
    conv_r = hl * Dh + 2 * gl * N
    xbc, dt = full.split([conv_r, hl], dim=-1)
    xbc = xbc.transpose(1, 2)                                              # (B, conv_r, S)
    if cache is not None:  # [conv state of these channels ; xbc]
        xbc = cache.update_conv_state(xbc, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    channels = split.conv_channels().to(hidden_states.device)
    w = self.conv1d.weight[channels]                                       # (conv_r, 1, k)
    bias = None if self.conv1d.bias is None else self.conv1d.bias[channels]
    out = F.conv1d(xbc.to(w.dtype), w, bias, padding=w.shape[-1] - 1, groups=w.shape[0])
    xbc = self.act(out[..., :xbc.shape[-1]]).to(xbc.dtype)[..., -seq_len:].transpose(1, 2)   # (B, S, conv_r)
    x, B, C = torch.split(xbc, [hl * Dh, gl * N, gl * N], dim=-1)
    dt = F.softplus(dt + self.dt_bias[heads].to(dt.dtype))                 # (B, S, H/P)
    lo, hi = self.time_step_limit
    dt = torch.clamp(dt, min=lo, max=hi)
    A = -torch.exp(self.A_log.float())[heads]
    io = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = recurrent_state(cache, self.layer_idx) if cache is not None else None
    y, h_end = ssd_scan(x.reshape(batch, seq_len, hl, Dh).to(io), dt.to(io), A, B.reshape(batch, seq_len, gl, N).to(io),
                        C.reshape(batch, seq_len, gl, N).to(io), self.D[heads], None, h0, return_final_state=True)
    if cache is not None:
        cache.update_recurrent_state(h_end, layer_idx=self.layer_idx)
    y = heads_to_tokens(y.reshape(batch, seq_len, hl * Dh), split)         # (B, s, d_inner)
    y = self.norm(y, gate)
    return self.out_proj(y.to(dtype))
