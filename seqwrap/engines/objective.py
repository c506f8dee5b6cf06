"""Sequence-level objectives: a loss L = f(S) of the per-sequence sums of token log-probabilities, exact chunk by chunk.

    engine = seqwrap.SeCO(model, chunk_size=4096)
    out = engine(input_ids, labels=labels, attention_mask=mask, objective=fn)   # fn(S) -> 0-d tensor
    out.loss            # f(S)
    out.sequence_logps  # S, (B,) float64

S[b] = sum over row b's counted labels (not ignore_index, after the shift) of log p(label | prefix). Preference
losses (DPO, IPO, ...) are of this form; per-row constants such as reference log-probs or completion lengths come
in through fn's closure. Since dL/d logp[b, t] = dL/dS[b] for every counted token t of row b:

  pass 1 (no grad) runs every chunk and sums each row's log-probs over it into S (float64);
  c = dL/dS by autograd on f, with S a float64 leaf (`weights` below): one scalar per row;
  pass 2 backpropagates, for each chunk, sum_b c[b] * (row b's log-prob sum over the chunk) together with the
      gradient relayed onto its K/V by later chunks. The relay is linear in the upstream gradient, so the
      parameter gradient is exactly dL/dtheta, as full backprop of f(S) gives.

fn sees S detached from the model (a leaf): gradients that fn's own tensors would need are not formed. What this
cannot make exact is refused before any gradient (`refuse`).
"""
from __future__ import annotations

import torch


def refuse(engine, objective, num_items, docs, *, sampled: bool) -> None:
    """Raises for what the objective step cannot make exact (or was not checked for), before any gradient.
    sampled: the engine backpropagates a sample of the chunks (SpaCO)."""
    name = engine.name
    if not callable(objective):
        raise TypeError(f"seqwrap.{name}: objective must be a callable fn(S) -> 0-d tensor (S: the (B,) float64 "
                        f"per-row log-prob sums), not {type(objective).__name__}")
    if num_items is not None:
        raise TypeError(f"seqwrap.{name}: num_items does not apply with objective= (the loss is fn(S), "
                        "normalise inside fn)")
    if engine._router_aux:
        raise NotImplementedError(f"seqwrap.{name}: objective= with the model's router auxiliary loss "
                                  "(output_router_logits=True) is not supported: the loss would be fn(S) + coef * aux, "
                                  "which the objective step does not form; set output_router_logits=False")
    if sampled:
        raise NotImplementedError(f"seqwrap.{name}: objective= is supported by SeCO only (exact gradients); the "
                                  "sampled chunks of SpaCO were not shown to give an unbiased estimate of fn's "
                                  "gradient")
    if engine.group is not None:
        raise NotImplementedError(f"seqwrap.{name}: objective= under Ulysses sequence parallelism is not supported yet "
                                  "(each rank holds part of every row's sum)")
    if engine._fsdp is not None:
        raise NotImplementedError(f"seqwrap.{name}: objective= on an FSDP2 model is not supported yet")
    if docs is not None:
        raise NotImplementedError(f"seqwrap.{name}: objective= with packed rows (several documents per row) is not "
                                  "supported: S would sum a row's documents together; pass one sequence per row")


def weights(objective, S: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(S) detached, float64 0-d; c = df/dS, (B,) float64). S: (B,) float64, the rows' log-prob sums."""
    leaf = S.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = objective(leaf)
        if not torch.is_tensor(value) or value.dim() != 0 or not value.dtype.is_floating_point:
            got = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if torch.is_tensor(value) else \
                type(value).__name__
            raise ValueError(f"seqwrap.{name}: objective must return a real 0-d tensor (the loss), got {got}")
        if not value.requires_grad:
            raise ValueError(f"seqwrap.{name}: the objective's value does not depend on S (no gradient path from "
                             "the per-row log-prob sums to the loss)")
        (c,) = torch.autograd.grad(value, leaf, allow_unused=True)
    if c is None:
        c = torch.zeros_like(leaf)
    if not bool(torch.isfinite(c).all()) or not bool(torch.isfinite(value)):
        raise FloatingPointError(f"seqwrap.{name}: the objective gave a non-finite loss or gradient "
                                 f"(loss {value.item()}, dL/dS {c.tolist()})")
    return value.detach().to(torch.float64), c.to(torch.float64)
