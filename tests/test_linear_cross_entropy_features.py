"""linear_cross_entropy's Liger/CCE options against plain torch in float64, forward and backward:
shift, ce_weight, use_token_scaling, return_z_loss (differentiable), token accuracy, predicted tokens,
entropy, with ignore_index, every reduction and their combinations."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import seqwrap

pytestmark = pytest.mark.ccore

REDUCTIONS = ["mean", "sum", "none"]


def torch_reference(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                    z_loss=0.0, softcap=None, ce_weight=None, use_token_scaling=False, shift=0):
    """Plain torch, full logits: (loss, z_loss, logits, labels used) with HF's shift."""
    logits = F.linear(hidden, weight, bias)
    if shift:
        logits, labels = logits[..., :-shift, :], labels[..., shift:]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = y != ignore_index
    ce = F.cross_entropy(flat, y, weight=ce_weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(flat, -1)
    if use_token_scaling:
        p = torch.softmax(flat, -1).gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
        ce = ce * p.detach()
    z = torch.where(keep, z_loss * lse**2, torch.zeros_like(lse))
    rows = ce + z
    if reduction == "none":
        return rows.reshape(labels.shape), z.reshape(labels.shape), logits, labels
    w_y = keep.double() if ce_weight is None else torch.where(keep, ce_weight[torch.where(keep, y, 0)], 0.0)
    denom = w_y.sum() if reduction == "mean" else torch.ones((), dtype=torch.float64)
    return rows.sum() / denom, z.sum() / denom, logits, labels


def inputs(B=2, T=9, H=8, V=23, bias=False):
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H, dtype=torch.float64) / H**0.5).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[0, ::3] = -100
    return hidden, weight, b, labels


def check(out, ref, params, upstream=None):
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ref) if upstream is None else upstream
    got = torch.autograd.grad(out, params, upstream, retain_graph=True)
    want = torch.autograd.grad(ref, params, upstream, retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"softcap": 3.0}], ids=str)
def test_shift_matches_hf_style(reduction, shift, opts):
    hidden, weight, bias, labels = inputs(bias=True)
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, shift=shift, reduction=reduction, chunk_size=4,
                                       **opts)
    ref, *_ = torch_reference(hidden, weight, labels, bias, shift=shift, reduction=reduction, **opts)
    assert out.shape == ref.shape
    check(out, ref, (hidden, weight, bias))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_class_weights_torch_semantics(reduction, smoothing):
    hidden, weight, bias, labels = inputs(bias=True)
    ce_weight = torch.rand(weight.shape[0], dtype=torch.float64) + 0.1
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, ce_weight=ce_weight, reduction=reduction,
                                       label_smoothing=smoothing, chunk_size=5)
    ref, *_ = torch_reference(hidden, weight, labels, bias, ce_weight=ce_weight, reduction=reduction,
                              label_smoothing=smoothing)
    if reduction == "mean":  # torch's own weighted mean, full logits
        y = labels.reshape(-1)
        torch.testing.assert_close(ref, F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 23), y,
                                                        weight=ce_weight, label_smoothing=smoothing))
    check(out, ref, (hidden, weight, bias))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_scaling(reduction):
    hidden, weight, _, labels = inputs()
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, use_token_scaling=True, reduction=reduction,
                                       chunk_size=4)
    ref, *_ = torch_reference(hidden, weight, labels, use_token_scaling=True, reduction=reduction)
    check(out, ref, (hidden, weight))
    plain = seqwrap.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    assert not torch.allclose(out, plain)  # the scaling did something


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("a, b", [(1.0, 0.0), (0.0, 1.0), (0.7, -2.5)])
def test_z_loss_output_differentiable_in_any_combination(reduction, a, b):
    hidden, weight, bias, labels = inputs(bias=True)
    loss, z = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, z_loss=0.05, return_z_loss=True,
                                           reduction=reduction, chunk_size=4, softcap=4.0)
    ref, zref, *_ = torch_reference(hidden, weight, labels, bias, z_loss=0.05, reduction=reduction, softcap=4.0)
    torch.testing.assert_close(z, zref.detach(), rtol=1e-10, atol=1e-12)
    check(a * loss + b * z, a * ref + b * zref, (hidden, weight, bias), upstream=None)
    (gz,) = torch.autograd.grad(z.sum(), weight)
    (gzr,) = torch.autograd.grad(zref.sum(), weight)
    torch.testing.assert_close(gz, gzr, rtol=1e-9, atol=1e-11)
    assert gz.abs().max() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_statistics_outputs(reduction):
    hidden, weight, _, labels = inputs()
    labels[1, :4] = torch.randint(0, 23, (4,))
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, reduction=reduction, shift=1, return_lse=True,
                                       return_token_accuracy=True, return_predicted_tokens=True, return_entropy=True,
                                       chunk_size=4)
    ref, _, logits, y = torch_reference(hidden, weight, labels, reduction=reduction, shift=1)
    check(out.loss, ref, (hidden, weight))
    pred = logits.argmax(-1)
    keep = y != -100
    torch.testing.assert_close(out.predicted_tokens, pred)
    hit = ((pred == y) & keep).double()
    want_acc = hit if reduction == "none" else hit.sum() / keep.sum()
    torch.testing.assert_close(out.token_accuracy, want_acc)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.lse, torch.logsumexp(logits, -1).detach(), rtol=1e-12, atol=1e-12)
    assert not out.predicted_tokens.requires_grad and not out.entropy.requires_grad


def test_all_features_combined_float32_vs_float64():
    hidden, weight, bias, labels = inputs(bias=True)
    ce_weight = torch.rand(23, dtype=torch.float64) + 0.5
    kw = dict(shift=True, ce_weight=ce_weight, use_token_scaling=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    loss, z = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, return_z_loss=True, chunk_size=3, **kw)
    ref, zref, *_ = torch_reference(hidden, weight, labels, bias, **kw)
    check(loss + 3 * z, ref + 3 * zref, (hidden, weight, bias))
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
    l32 = seqwrap.linear_cross_entropy(h32, w32, labels, b32, chunk_size=3, **{**kw, "ce_weight": ce_weight.float()})
    torch.testing.assert_close(l32.double(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, err", [
    (dict(shift=-1), "shift"), (dict(shift=9), "shift"), (dict(ce_weight=torch.ones(5)), "ce_weight"),
    (dict(ce_weight=torch.ones(23, dtype=torch.int64)), "ce_weight"),
])
def test_bad_options_named(bad, err):
    hidden, weight, _, labels = inputs()
    with pytest.raises((ValueError, TypeError), match=err):
        seqwrap.linear_cross_entropy(hidden, weight, labels, **bad)
