"""Forward-only evaluation of a chunked engine: pass 1 alone (SeCO.evaluate, or an engine call under no_grad).

Each chunk runs once without grad, attending to the stored K/V of the earlier chunks (the same store and
run-time invariants as a training step's pass 1); its token losses are summed in float64. The router
auxiliary term, where the model's loss has one, is computed from the whole sequence's router logits. Nothing
is recomputed and no gradient is written: memory is one chunk's activations plus the past K/V.
"""
from __future__ import annotations

import torch

from ..hf.attention import NeedsConcat
from ..hf.router_aux import RouterAux


def forward_only(engine, st):
    """engine: a SeCO (or SpaCO); st: its checked _Step. Returns (summed token losses of the whole step,
    float64 0-d, summed over the Ulysses group; the auxiliary term that is not divided by the normaliser)."""
    xfer = engine._transfers(st.ids.device) if engine.offload else None
    while True:
        cache = engine._make_store(st, xfer)
        try:
            with torch.no_grad(), engine.adapter.step_context(engine.name, cache, st.pos,
                                                              chunked=engine.attention == "chunked"):
                total, extra = _pass(engine, st, cache)
        except NeedsConcat as switch:
            engine._concat_or_refuse(switch, st.docs, gradient_touched=False)
            continue
        finally:
            cache.release_all()
        break
    engine._auto_attention = False
    return engine._group_sum(total), extra  # Ulysses: each rank summed its own tokens


def _pass(engine, st, cache):
    """Every chunk in order: (summed token losses, float64 0-d; coef * router aux loss or 0.0)."""
    adapter, bounds = engine.adapter, st.bounds
    aux = (RouterAux(adapter.causal_lm, adapter.decoder, bounds, st.ids.shape[0], st.mask, engine.name)
           if engine._router_aux else None)
    total = torch.zeros((), dtype=torch.float64, device=st.ids.device)
    last = len(bounds) - 1
    for i, (s, e) in enumerate(bounds):
        cache.begin(i, "record", store=i < last)
        out = adapter.hidden(st.ids[:, s:e], None if st.mask is None else st.mask[:, :e], cache,
                             None if st.pos is None else st.pos[:, s:e], router_logits=aux is not None)
        engine._check_updates(cache, i)
        h, router = out if aux is not None else (out, None)
        if aux is not None:
            aux.record(i, router)
        total += engine._loss_sum(h, st.shift[:, s:e]).double()
        del h, router, out
    extra = 0.0
    if aux is not None:
        aux.prepare(grad=False)
        extra = aux.value
    return total, extra
