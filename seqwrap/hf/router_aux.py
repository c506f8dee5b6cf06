"""MoE router auxiliary losses, exact chunk by chunk.

With `output_router_logits=True` (config) HF's MoE causal LMs add `coef * aux(R)` to the loss, where R
is the router logits of every MoE layer for every token of the call (one (B*T, experts) tensor per
layer) and aux is the family's load-balancing loss (Switch-style: experts * sum_e f_e * P_e, f the
routed fractions, P the mean router probabilities; some families differ). aux is not a sum over
tokens, so a chunk alone cannot form its share. But the parameters reach aux only through R, so:

  pass 1 (no grad) keeps each chunk's router logits (detached);
  `RouterAux.prepare` evaluates the family's own aux on the whole sequence's R (the causal LM's own
      forward, with its base model swapped for a stub that returns R: the same function, arguments
      and mask full backprop uses) and takes g = d(coef * aux)/dR by autograd;
  pass 2 adds, for chunk c, the term sum_l <R_c,l, g_c,l> to the chunk's backward: its gradient with
      respect to every parameter is exactly chunk c's share of d(coef * aux)/dtheta (chain rule).

Exact for any differentiable function of the router logits, whatever its form. Memory: R of the
whole step, (MoE layers, B*T, experts) in the model's dtype. The coefficient is read from the
causal LM (`router_aux_loss_coef`, `aux_loss_coef`) after checking that its forward multiplies
aux_loss by that attribute; otherwise the model is refused before any gradient.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .compat import UnsupportedModelError

COEFFICIENT_NAMES = ("router_aux_loss_coef", "aux_loss_coef")


def wants_router_logits(causal_lm: nn.Module) -> bool:
    return bool(getattr(causal_lm.config, "output_router_logits", False))


def aux_coefficient(causal_lm: nn.Module, engine: str) -> float:
    """The factor the causal LM's forward puts on its aux loss (refused when it cannot be told)."""
    try:
        source = inspect.getsource(type(causal_lm).forward)
    except (OSError, TypeError) as exc:
        raise UnsupportedModelError(f"seqwrap.{engine}: cannot read {type(causal_lm).__name__}.forward to find how "
                                    f"it weighs its router auxiliary loss ({exc}); set output_router_logits=False"
                                    ) from exc
    for name in COEFFICIENT_NAMES:
        if f"self.{name} * aux_loss" in source:
            value = getattr(causal_lm, name, None)
            if value is None:
                value = getattr(causal_lm.config, name, None)
            if isinstance(value, (int, float)):
                return float(value)
    raise UnsupportedModelError(
        f"seqwrap.{engine}: model_type '{causal_lm.config.model_type}' has output_router_logits=True, but its "
        f"forward does not add `self.<coef> * aux_loss` with a known coefficient ({', '.join(COEFFICIENT_NAMES)}); "
        "the chunked step cannot reproduce that auxiliary loss: set output_router_logits=False")


def _as_rows(logits: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """One layer's router logits of a chunk as (B, L, experts) (HF gives (B*L, experts) or (B, L, experts))."""
    if logits.dim() == 2 and logits.shape[0] == batch * length:
        return logits.reshape(batch, length, logits.shape[-1])
    if logits.dim() == 3 and logits.shape[:2] == (batch, length):
        return logits
    raise UnsupportedModelError(f"seqwrap: router logits of shape {tuple(logits.shape)} for a chunk of {batch} x "
                                f"{length} tokens; expected (B*L, experts) or (B, L, experts)")


class _RouterLogitsOnly(nn.Module):
    """Stand-in base model: returns the given router logits and one zero hidden state per row."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextmanager
def _swapped_base_model(causal_lm: nn.Module, decoder: nn.Module, stub: nn.Module):
    """Within the block the causal LM's child `decoder` is `stub` (the same attribute name)."""
    name = next((n for n, m in causal_lm.named_children() if m is decoder), None)
    if name is None:
        raise UnsupportedModelError(f"seqwrap: {type(causal_lm).__name__} does not hold its decoder as a child")
    causal_lm._modules[name] = stub
    try:
        yield
    finally:
        causal_lm._modules[name] = decoder


class RouterAux:
    """The router auxiliary loss of one step (see the module docstring).

    decoder: the causal LM's base model (its child); bounds: the step's chunks [(start, end)]; batch: B; attention_mask: (B, T) or None (as the engine
    passes it to full backprop's aux)."""

    def __init__(self, causal_lm: nn.Module, decoder: nn.Module, bounds, batch: int, attention_mask, engine: str):
        self.causal_lm = causal_lm
        self.decoder = decoder
        self.bounds = bounds
        self.batch = batch
        self.mask = attention_mask
        self.engine = engine
        self.coef = aux_coefficient(causal_lm, engine)
        self.recorded: dict[int, list[torch.Tensor]] = {}   # chunk -> per layer (B, L, experts), detached
        self.grads: dict[int, list[torch.Tensor]] | None = None
        self.value = None                                    # coef * aux, 0-d float64

    def record(self, chunk: int, router_logits) -> None:
        s, e = self.bounds[chunk]
        self.recorded[chunk] = [_as_rows(r.detach(), self.batch, e - s) for r in self._layers(router_logits)]

    def _layers(self, router_logits):
        if router_logits is None:
            raise UnsupportedModelError(f"seqwrap.{self.engine}: model_type '{self.causal_lm.config.model_type}' has "
                                        "output_router_logits=True but its decoder returned no router_logits")
        return list(router_logits)

    def prepare(self, grad: bool = True) -> None:
        """After pass 1: coef * aux of the whole sequence and (grad=True) its gradient per chunk and layer;
        grad=False (forward-only evaluation): the value only, no autograd at all (inference mode allowed)."""
        from transformers.modeling_outputs import MoeModelOutputWithPast

        chunks = sorted(self.recorded)
        if chunks != list(range(len(self.bounds))):
            raise RuntimeError(f"seqwrap.{self.engine}: router logits recorded for chunks {chunks} of "
                               f"{len(self.bounds)}")
        layers = len(self.recorded[0])
        full = [torch.cat([self.recorded[c][l] for c in chunks], dim=1) for l in range(layers)]
        if grad:
            full = [r.requires_grad_() for r in full]
        hidden_size = self.causal_lm.config.hidden_size
        ref = full[0]
        stub = _RouterLogitsOnly(MoeModelOutputWithPast(
            last_hidden_state=ref.new_zeros(self.batch, 1, hidden_size),
            router_logits=tuple(r.reshape(-1, r.shape[-1]) for r in full)))
        ids = torch.zeros(self.batch, 1, dtype=torch.long, device=ref.device)
        with torch.set_grad_enabled(grad), _swapped_base_model(self.causal_lm, self.decoder, stub):
            # output_router_logits is not passed: the forward decides from its own default, as it does in the
            # user's model(ids, labels=...) (transformers 5.15's JetMoE reads only the keyword: no aux term)
            out = self.causal_lm(input_ids=ids, attention_mask=self.mask, logits_to_keep=1, use_cache=False)
        aux = getattr(out, "aux_loss", None)
        if aux is None:  # HF's loss has no auxiliary term for this model as configured
            self.value, self.grads = 0.0, {c: [None] * layers for c in chunks}
            self.recorded.clear()
            return
        if not torch.is_tensor(aux):
            raise UnsupportedModelError(f"seqwrap.{self.engine}: model_type '{self.causal_lm.config.model_type}' "
                                        f"returned aux_loss {aux!r} for its router logits; set output_router_logits=False")
        total = self.coef * aux
        self.value = total.detach().double()
        if not grad:
            self.grads = {}
            self.recorded.clear()
            return
        grads = torch.autograd.grad(total, full, allow_unused=True)
        self.grads = {}
        for c in chunks:
            s, e = self.bounds[c]
            self.grads[c] = [None if g is None else g[:, s:e].detach() for g in grads]
        self.recorded.clear()

    def term(self, chunk: int, router_logits) -> torch.Tensor | None:
        """Pass 2: sum over layers of <R_chunk, g_chunk> (its gradient is the chunk's share of coef * aux)."""
        s, e = self.bounds[chunk]
        total = None
        for r, g in zip(self._layers(router_logits), self.grads.pop(chunk)):
            if g is None or not r.requires_grad:
                continue
            part = (_as_rows(r, self.batch, e - s) * g.to(r.dtype)).sum()
            total = part if total is None else total + part
        return total
