"""Tiny random HF Mamba models and full-backprop references for the adjoint-sharding tests."""
import torch


def tiny_mamba(layers=2, dtype=torch.float64, seed=0, hidden=16, state=4, inner=32, vocab=50, **kw):
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                      intermediate_size=inner, time_step_rank=4, conv_kernel=4, **kw)
    model = MambaForCausalLM(cfg).to(dtype)
    # HF's init gives every channel the same A = -(1..N): make A_log, D and the conv random too
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.A_log.add_(0.3 * torch.randn_like(block.mixer.A_log))
            block.mixer.D.add_(0.3 * torch.randn_like(block.mixer.D))
            block.norm.weight.add_(0.1 * torch.randn_like(block.norm.weight))
    return model


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def full_backprop(model, ids, labels=None, num_items=None):
    """HF's own forward + backward over the whole sequence."""
    model.zero_grad(set_to_none=True)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    out = model(ids, labels=ids if labels is None else labels, **kw)
    out.loss.backward()
    return out.loss.detach(), grads_of(model)


def max_rel_err(got, ref):
    """Largest per-parameter relative error ||g - r|| / ||r|| (and which parameter)."""
    worst, name = 0.0, None
    for n, r in ref.items():
        e = ((got[n] - r).norm() / r.norm().clamp_min(1e-300)).item()
        if e > worst:
            worst, name = e, n
    return worst, name


def total_rel_err(got, ref):
    """||all grads - reference|| / ||reference||, all parameters stacked."""
    num = sum(((got[n] - r) ** 2).sum() for n, r in ref.items())
    den = sum((r ** 2).sum() for r in ref.values())
    return (num / den).sqrt().item()
