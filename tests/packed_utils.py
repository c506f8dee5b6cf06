"""Packed batches for the tests, and the reference: every document trained on its own."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hf_tiny import VOCAB


def packed_batch(lengths: list[list[int]], seed: int = 1, holes: bool = True):
    """Rows made of documents of the given lengths (each row sums to the same T).

    Returns ids (B, T), labels (B, T) (with a few -100 inside documents when holes), position_ids
    (B, T) restarting per document, cu_seqlens (D + 1,) over the flattened batch, seq_idx (B, T)."""
    T = sum(lengths[0])
    assert all(sum(r) == T for r in lengths), "every row must hold T tokens"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), T), generator=g)
    labels = ids.clone()
    if holes:
        drop = torch.rand(ids.shape, generator=g) < 0.15
        labels[drop] = -100
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    seq = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in lengths])
    cu = torch.tensor([0] + [n for row in lengths for n in row]).cumsum(0).to(torch.int32)
    return ids, labels, pos, cu, seq.to(torch.int32)


def spans(lengths: list[list[int]]):
    """(row, start, end) of every document."""
    out = []
    for b, row in enumerate(lengths):
        s = 0
        for n in row:
            out.append((b, s, s + n))
            s += n
    return out


def per_document_reference(model, ids, labels, lengths, num_items=None):
    """Each document through the model on its own (full backprop): (sum of all token losses /
    the step's label count, {name: grad}). The loss is formed in float64 from the logits."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for b, s, e in spans(lengths):
        logits = model(ids[b:b + 1, s:e]).logits
        shift = F.pad(labels[b:b + 1, s + 1:e], (0, 1), value=-100)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction="sum")
        count += int((shift != -100).sum())
    loss = total / (num_items if num_items is not None else count)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, count
