"""AdjointSharding on tiny HF Mamba models against HF's own full backprop (float64)."""
import pytest
import torch

import seqwrap
from seqwrap.hf.mamba import MambaAdapter

from .mamba_utils import full_backprop, grads_of, max_rel_err, tiny_mamba, total_rel_err


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and idle OpenMP threads spinning on a shared 2-core machine
    can slow a step down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(model, ids, labels=None, num_items=None, zero=True, **kw):
    if zero:
        model.zero_grad(set_to_none=True)
    out = seqwrap.AdjointSharding(model, **kw)(ids, labels, num_items=num_items)
    return out, grads_of(model)


def test_chunked_forward_carries_conv_and_ssm_state():
    """The adapter's chunked forward gives HF's full-sequence logits (HF's own cache path would not:
    it zero-pads the conv of every multi-token chunk)."""
    model = tiny_mamba(layers=2)
    ids = torch.randint(0, 50, (2, 23))
    ad = MambaAdapter(model)
    with torch.no_grad():
        ref = model(ids).logits
        states, outs = ad.zero_states(2, ids.device), []
        for s in range(0, 23, 5):
            x, states = ad.stack(ad.embeddings(ids[:, s:s + 5]), states)
            outs.append(model.lm_head(model.backbone.norm_f(x)).float())
    assert torch.allclose(torch.cat(outs, 1), ref, rtol=1e-6, atol=1e-6)   # HF rounds logits to float32


@pytest.mark.parametrize("layers,chunk", [(1, 7), (2, 8), (3, 5)])
def test_exact_equals_full_backprop(layers, chunk):
    model = tiny_mamba(layers=layers, seed=layers)
    ids = torch.randint(0, 50, (2, 37))
    loss0, g0 = full_backprop(model, ids)
    out, g1 = run(model, ids, chunk_size=chunk)
    err, name = max_rel_err(g1, g0)
    assert err <= 1e-10, (err, name)
    assert set(g1) == set(g0)
    assert abs(out.loss.item() - loss0.item()) <= 1e-6 * abs(loss0.item())
    assert out.num_chunks == -(-37 // chunk) and out.num_tokens == 2 * 36


def test_exact_labels_ignore_and_num_items():
    model = tiny_mamba(layers=2, seed=4)
    ids = torch.randint(0, 50, (1, 30))
    labels = ids.clone()
    labels[0, :9] = -100
    labels[0, 20] = -100
    _, g0 = full_backprop(model, ids, labels)
    out, g1 = run(model, ids, labels, chunk_size=6)
    assert max_rel_err(g1, g0)[0] <= 1e-10 and out.num_tokens == 29 - 8 - 1
    # HF's Mamba honours num_items_in_batch only in newer releases: the reference sums its float32
    # token losses (as ForCausalLMLoss does) and divides by 50 itself
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum") / 50
    ref.backward()
    g0 = grads_of(model)
    out, g1 = run(model, ids, labels, num_items=50, chunk_size=6)
    assert max_rel_err(g1, g0)[0] <= 1e-10


def test_exact_accumulates_into_existing_grads():
    model = tiny_mamba(layers=1, seed=5)
    ids = torch.randint(0, 50, (1, 20))
    _, g0 = full_backprop(model, ids)
    run(model, ids, chunk_size=6)
    _, g2 = run(model, ids, chunk_size=6, zero=False)
    assert max_rel_err(g2, {n: 2 * g for n, g in g0.items()})[0] <= 1e-10


def test_float32_and_bf16_models_run():
    model = tiny_mamba(layers=2, dtype=torch.float32, seed=6)
    ids = torch.randint(0, 50, (2, 40))
    loss0, g0 = full_backprop(model, ids)
    out, g1 = run(model, ids, chunk_size=16)
    assert max_rel_err(g1, g0)[0] <= 1e-4
    model = model.to(torch.bfloat16)
    loss0, g0 = full_backprop(model, ids)
    out, g1 = run(model, ids, chunk_size=16)
    assert abs(out.loss.item() - loss0.item()) <= 0.02 * loss0.item()
    assert total_rel_err(g1, g0) <= 0.1   # bf16 activations: only a sanity check


def test_sharded_one_layer_equals_backprop():
    model = tiny_mamba(layers=1, seed=7)
    ids = torch.randint(0, 50, (2, 33))
    _, g0 = full_backprop(model, ids)
    _, g1 = run(model, ids, chunk_size=8, mode="sharded")
    assert max_rel_err(g1, g0)[0] <= 1e-10


def prop3_reference(model, ids):
    """The paper's multi-layer gradient (Prop. 3) computed directly with HF's modules: every layer k gets
    v = dLoss/d(top of the residual stream) as the cotangent of its block output, its input detached
    (layer 0's input is the embedding, which keeps its gradient)."""
    model.zero_grad(set_to_none=True)
    bb = model.backbone
    with torch.no_grad():
        xs, x = [], bb.embeddings(ids)
        for block in bb.layers:
            xs.append(x)
            x = block(x)
    top = x.detach().requires_grad_()
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    logits = model.lm_head(bb.norm_f(top)).float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    v = top.grad
    outs = [bb.layers[0](bb.embeddings(ids))] + [blk(xk) for blk, xk in zip(bb.layers[1:], xs[1:])]
    torch.autograd.backward(outs, [v.to(o.dtype) for o in outs])
    return grads_of(model)


def test_sharded_multilayer_is_prop3_not_backprop():
    model = tiny_mamba(layers=3, seed=8)
    ids = torch.randint(0, 50, (2, 33))
    _, g_bp = full_backprop(model, ids)
    g_p3 = prop3_reference(model, ids)
    _, g_sh = run(model, ids, chunk_size=8, mode="sharded")
    assert max_rel_err(g_sh, g_p3)[0] <= 1e-10       # we implement Prop. 3 faithfully
    diff = total_rel_err(g_sh, g_bp)
    assert diff > 1e-3                                 # ... which is not the gradient for >1 layer
    # the top layer and the head are exact: nothing above them is dropped
    top = {n: g for n, g in g_bp.items() if "layers.2." in n or "norm_f" in n}
    assert max_rel_err(g_sh, top)[0] <= 1e-10


def test_truncation_error_shrinks_with_T():
    model = tiny_mamba(layers=1, seed=9)
    ids = torch.randint(0, 50, (1, 48))
    _, g0 = full_backprop(model, ids)
    errs = []
    for T in (1, 4, 16, 40):
        _, g = run(model, ids, chunk_size=8, mode="sharded", truncation=T)
        errs.append(total_rel_err(g, g0))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    _, g = run(model, ids, chunk_size=8, mode="sharded", truncation=48)   # window covers everything
    assert max_rel_err(g, g0)[0] <= 1e-10


def test_truncated_independent_of_chunking():
    model = tiny_mamba(layers=2, seed=10)
    ids = torch.randint(0, 50, (1, 30))
    _, ga = run(model, ids, chunk_size=30, mode="sharded", truncation=6)
    _, gb = run(model, ids, chunk_size=4, mode="sharded", truncation=6)
    assert max_rel_err(gb, ga)[0] <= 1e-10


def test_refusals():
    from transformers import Mamba2Config, Mamba2ForCausalLM
    m2 = Mamba2ForCausalLM(Mamba2Config(vocab_size=20, hidden_size=16, num_heads=2, head_dim=16, state_size=4,
                                        num_hidden_layers=1, n_groups=1, expand=2))
    with pytest.raises(TypeError, match="Mamba2ForCausalLM is not supported"):
        seqwrap.AdjointSharding(m2)
    with pytest.raises(TypeError, match="expected a transformers MambaForCausalLM"):
        seqwrap.AdjointSharding(torch.nn.Linear(2, 2))
    model = tiny_mamba(layers=1)
    with pytest.raises(ValueError, match="mode must be"):
        seqwrap.AdjointSharding(model, mode="fast")
    with pytest.raises(ValueError, match="truncation applies to mode='sharded'"):
        seqwrap.AdjointSharding(model, truncation=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        seqwrap.AdjointSharding(model, chunk_size=0)
    with pytest.raises(ValueError, match="labels have shape"):
        seqwrap.AdjointSharding(model)(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
