"""Chunked forward of HF `MambaForCausalLM` with explicit per-layer states.

HF's `MambaMixer.slow_forward` zero-pads the depthwise conv for every multi-token call, so chunks fed
through its cache are computed wrongly. This adapter owns a correct chunked mixer forward: the conv
state (the last conv_kernel-1 pre-conv inputs) and the SSM state are carried from chunk to chunk. It
uses the HF modules' own parameters (weights load and save as usual) and reproduces the HF slow path's
dtype casts exactly (A, D and the dt bias in float32; B and u rounded to float32 inside the B*u term;
logits in float32), so that in float64 the chunked result matches HF's own forward/backward to
rounding.

Shapes: hidden states (batch, T, hidden); conv state (batch, d_inner, conv_kernel-1) in the model dtype;
SSM state (batch, d_inner, d_state) in float32 (float64 for float64 models).

Packed rows (several documents per row): the engine hands each chunk a `seg` = (reset, taps): reset
(batch, T) int32 marks document starts for the scan kernels (the SSM state is zeroed there, also a
state carried in from the previous chunk), taps (batch, conv_kernel, T) says which conv inputs of each
output lie in its own document (the conv state is cut at a document start, as mamba-ssm's causal_conv1d
with seq_idx does). Without seg the plain F.conv1d / scan run unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX, shift_labels
from ..ops.selective_scan import _scan
from .versions import check_model_versions


def _refuse(model):
    name = type(model).__name__
    if "Mamba2" in name:
        raise TypeError(
            "seqwrap.AdjointSharding: Mamba2ForCausalLM is not supported: its SSD mixer (multi-head, grouped "
            "B/C, chunked SSD scan) is a different recurrence from the Mamba-1 selective scan this engine "
            "implements; use MambaForCausalLM")
    raise TypeError(f"seqwrap.AdjointSharding: expected a transformers MambaForCausalLM, got {name}")


class MambaAdapter:
    """Runs the parts of an HF MambaForCausalLM on one chunk of tokens with carried states."""

    def __init__(self, model):
        try:
            from transformers import MambaForCausalLM
        except ImportError as exc:  # pragma: no cover
            raise ImportError("seqwrap.AdjointSharding needs transformers (pip install seqwrap[hf])") from exc
        if not isinstance(model, MambaForCausalLM):
            _refuse(model)
        check_model_versions(model, "seqwrap.AdjointSharding")
        self.model = model
        self.config = model.config
        self.embeddings = model.backbone.embeddings
        self.layers = list(model.backbone.layers)
        self.norm_f = model.backbone.norm_f
        self.lm_head = model.lm_head
        self.kconv = self.config.conv_kernel
        self._casts = None

    # ---- float32 parameter casts --------------------------------------------------------------
    # HF uses A = -exp(A_log.float()), D.float() and dt_proj.bias.float(). Their gradients are rounded
    # to float32 where the cast happens: once per backward in HF, but once per chunk if every chunk
    # redid the cast. Between begin_step() and end_step() the cast values are leaves (in the wide
    # dtype) whose gradients add up over all chunks; end_step() sends the sums through the casts once.
    def begin_step(self):
        self._casts = {}
        for block in self.layers:
            m = block.mixer
            wide = torch.float64 if m.A_log.dtype == torch.float64 else torch.float32
            vals = (-torch.exp(m.A_log.float()), m.D.float(), m.dt_proj.bias.float())
            self._casts[id(m)] = (vals, tuple(v.detach().to(wide).requires_grad_() for v in vals))

    def cast_leaves(self):
        return [leaf for _, leaves in self._casts.values() for leaf in leaves]

    def end_step(self):
        """Backpropagates the summed cast-leaf gradients into A_log, D and dt_proj.bias."""
        if self._casts is None:
            return
        outs, grads = [], []
        for vals, leaves in self._casts.values():
            for v, leaf in zip(vals, leaves):
                if leaf.grad is not None and v.requires_grad:   # frozen parameters (e.g. under PEFT) are skipped
                    outs.append(v)
                    grads.append(leaf.grad.to(v.dtype))
        self._casts = None
        if outs:
            torch.autograd.backward(outs, grads)

    def discard_step(self):
        """Drops the step's cast leaves (after end_step, or after a failed step)."""
        self._casts = None

    def _mixer_params(self, m):
        """(A, D, dt bias) as HF casts them: the step's leaves between begin_step/end_step."""
        if self._casts is not None:
            return self._casts[id(m)][1]
        return -torch.exp(m.A_log.float()), m.D.float(), m.dt_proj.bias.float()

    # ---- states -------------------------------------------------------------------------------
    def zero_states(self, batch, device):
        """Per layer (conv_state, ssm_state), all zeros: the state before the first token."""
        out = []
        for block in self.layers:
            m = block.mixer
            w = m.in_proj.weight
            comp = torch.float64 if w.dtype == torch.float64 else torch.float32
            out.append((torch.zeros(batch, m.intermediate_size, self.kconv - 1, dtype=w.dtype, device=device),
                        torch.zeros(batch, m.intermediate_size, m.ssm_state_size, dtype=comp, device=device)))
        return out

    # ---- mixer ----------------------------------------------------------------------------------
    def _pre_scan(self, m, hs, conv_state, params=True, dt_bias=None, taps=None):
        """in_proj + causal conv (continuing conv_state) + x_proj/dt_proj: the scan's inputs.
        hs: (batch, T, hidden). Returns u (batch, d_inner, T), dt, B, C (batch, N, T), gate z, new conv state.
        params=False uses detached parameters (look-ahead steps that must not collect gradients).
        taps: (batch, conv_kernel, T) bool or None: the conv inputs inside each output's document."""
        P = (lambda p: p) if params else (lambda p: None if p is None else p.detach())
        proj = F.linear(hs, P(m.in_proj.weight), P(m.in_proj.bias)).transpose(1, 2)  # (batch, 2*d_inner, T)
        x, gate = proj.chunk(2, dim=1)
        T = x.shape[-1]
        xc = torch.cat([conv_state.to(x.dtype), x], dim=-1)                # (batch, d_inner, k-1+T)
        new_conv = xc[:, :, xc.shape[-1] - (self.kconv - 1):]
        w = P(m.conv1d.weight)                                             # (d_inner, 1, k)
        bias = P(m.conv1d.bias) if m.use_conv_bias else None
        if taps is None:
            u = F.conv1d(xc.to(w.dtype), w, bias, groups=x.shape[1])
        else:
            u = _document_conv(xc.to(w.dtype), w, bias, taps)
        u = m.act(u).to(x.dtype)                                           # (batch, d_inner, T)
        ts, B, C = torch.split(F.linear(u.transpose(1, 2), P(m.x_proj.weight)),
                               [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        ts = P(m.dt_proj.weight) @ ts.transpose(1, 2)                      # (batch, d_inner, T)
        dt = F.softplus(ts + P(dt_bias).to(ts.dtype)[..., None])
        assert dt.shape[-1] == T
        return u, dt, B.transpose(1, 2), C.transpose(1, 2), gate, new_conv

    def mixer(self, m, hs, conv_state, ssm_state, *, lookahead=None, truncation=0, seg=None, seg_lookahead=None):
        """Mixer output (batch, T, hidden) and the states after these T tokens.

        lookahead: optional (batch, T2, hidden) normalised inputs of the next T2 tokens: they run through
        the same scan call with detached parameters so that a truncated adjoint (truncation > 0) of the
        own T steps can see the losses up to `truncation` steps ahead; only the own steps collect
        gradients. Returns (out_own, out_lookahead or None, conv_state, ssm_state) where the states are
        those after the own T tokens (ssm_state only when there is no look-ahead).
        seg, seg_lookahead: (reset, taps) of the own / look-ahead tokens in a packed batch (module docstring)."""
        A, Dv, dt_bias = self._mixer_params(m)
        if seg is not None and lookahead is not None and seg_lookahead is None:
            raise ValueError("seqwrap.AdjointSharding: a packed chunk needs the document segments of its "
                             "look-ahead tokens too")
        u, dt, B, C, z, conv_end = self._pre_scan(m, hs, conv_state, dt_bias=dt_bias,
                                                  taps=None if seg is None else seg[1])
        own = u.shape[-1]
        parts = [(u, dt, B, C, z)]
        if lookahead is not None:
            with torch.no_grad():
                parts.append(self._pre_scan(m, lookahead, conv_end, params=False, dt_bias=dt_bias,
                                            taps=None if seg is None else seg_lookahead[1])[:5])
        cat = lambda i: torch.cat([p[i] for p in parts], -1) if len(parts) > 1 else parts[0][i]  # noqa: E731
        u_all, dt_all, B_all, C_all, z_all = (cat(i) for i in range(5))
        # HF rounds B and u to float32 in the B*u term (a no-op below float64): do the same.
        io = u_all.dtype
        reset = None
        if seg is not None:
            reset = seg[0] if lookahead is None else torch.cat([seg[0], seg_lookahead[0]], -1)
        y, h_end = _scan(u_all.float().to(io), dt_all, A, B_all.float().to(io), C_all, None, z_all, ssm_state,
                         truncation=truncation, grad_len=own, reset=reset)
        outs = []
        for k, (uk, _, _, _, zk) in enumerate(parts):
            sl = slice(0, own) if k == 0 else slice(own, None)
            Dk = Dv if k == 0 else Dv.detach()
            yk = y[..., sl] + uk * Dk[None, :, None] * F.silu(zk)
            W, b = (m.out_proj.weight, m.out_proj.bias) if k == 0 else (
                m.out_proj.weight.detach(), None if m.out_proj.bias is None else m.out_proj.bias.detach())
            outs.append(F.linear(yk.transpose(1, 2).to(hs.dtype), W, b))
        return outs[0], (outs[1] if lookahead is not None else None), conv_end, (h_end if lookahead is None else None)

    def block(self, block, x, state, **kw):
        """HF MambaBlock with carried states: x + mixer(norm(x)) (residual in float32 when configured).
        kw: the mixer's keywords (seg for a packed chunk)."""
        residual = x
        h = block.norm(x.to(dtype=block.norm.weight.dtype))
        if block.residual_in_fp32:
            residual = residual.to(torch.float32)
        out, _, conv, ssm = self.mixer(block.mixer, h, state[0], state[1], **kw)
        return residual + out, (conv, ssm)

    def stack(self, x, states, seg=None):
        """All layers over one chunk; returns the top hidden states and the new per-layer states.
        seg: the chunk's document segment in a packed batch (module docstring), or None."""
        new = []
        for block, st in zip(self.layers, states):
            x, st = self.block(block, x, st, seg=seg)
            new.append(st)
        return x, new

    # ---- head -----------------------------------------------------------------------------------
    def loss_sum(self, x, targets):
        """Sum of token cross-entropies of one chunk, as HF computes them (float32 logits).
        x: (batch, T, hidden) top hidden states; targets: (batch, T) already shifted, -100 ignored."""
        h = self.norm_f(x)
        logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")


def _document_conv(xc, w, bias, taps):
    """Depthwise causal conv whose taps stop at document starts. xc (batch, C, k-1+T) (carried conv inputs,
    then the chunk's); w (C, 1, k); taps (batch, k, T) bool: tap j of output t (input xc[..., t+j]) is in
    t's document. Returns (batch, C, T), as F.conv1d(xc, w, bias, groups=C) with the other taps zeroed."""
    k, T = w.shape[-1], taps.shape[-1]
    keep = taps.to(xc.dtype)
    out = sum(w[None, :, 0, j, None] * (xc[:, :, j:j + T] * keep[:, None, j]) for j in range(k))
    return out if bias is None else out + bias[None, :, None]


def shifted_targets(input_ids, labels):
    """HF causal-LM semantics: labels aligned with input_ids, shifted by one inside; the last position
    has no target. Returns (batch, L) targets with -100 where ignored."""
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"seqwrap.AdjointSharding: labels have shape {tuple(labels.shape)} but input_ids "
                         f"{tuple(input_ids.shape)}; they must match (labels are shifted inside)")
    return shift_labels(labels, IGNORE_INDEX)
