"""The peers' own test grids for a fused linear cross-entropy, ported by their parameter values.

Sources (parameter values only; the harness is ours):
  Liger-Kernel test/transformers/test_fused_linear_cross_entropy.py: test_correctness (32 cases),
    test_correctness_with_forward_only (32), test_correctness_functional (16),
    test_correctness_with_token_accuracy (16, here also asking for the predicted tokens), test_amp (16),
    the four token-scaling tests + test_token_scaling_with_ignore_index (5),
    test_liger_fused_linear_cross_entropy_structured_output (4)                         = 121 cases
  apple/ml-cross-entropy (CCE) tests/test_cce_loss_forward.py (144: dtype x softcap x bias x shift x
    invalids x shape; CCE's `impl` axis chooses between CCE's own backends and is dropped),
    tests/test_cce_loss_backward.py (144: bf16, as CCE's sliced lists select) and test_loss_partials (3)
                                                                                          = 291 cases
Every case passes (412 in all, none unsupported): see README's fused-loss paragraph.

Each case is checked against plain torch on full logits in float64 (forward and backward). In float32 and
half precision the bound is the peer's tolerance plus the error that plain torch in the same dtype makes
against float64 (CCE's own criterion): seqwrap may be as inexact as torch, not more. Sizes are shrunk
where the peers use GPU-sized problems (noted at each grid); chunk sizes are small so every case runs
several chunks. Semantics followed are the peers' (Liger's CrossEntropyWithZLoss reference): the loss
includes the z-loss; "mean" divides the cross-entropy by the sum of the label weights (F.cross_entropy)
and the z-loss by the count of non-ignored tokens.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.ops.cross_entropy import LinearCrossEntropyOutput

pytestmark = pytest.mark.ccore


# -- the reference: plain torch, full logits ----------------------------------------------------------------
def reference(h, w, b, y, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
              ce_weight=None, token_scaling=False, shift=0):
    """h (..., T, H), w (V, H), b (V,)|None, y (..., T). Logits in float32 (float64 for float64 input) as the
    peers' references compute them. Returns (loss incl. z-loss, z-loss) reduced as `reduction`."""
    if shift:
        h, y = h[..., :-shift, :], y[..., shift:]
    logits = F.linear(h, w, b)
    real = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(real)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    flat, t = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    keep = t != ignore_index
    cw = None if ce_weight is None else ce_weight.to(real)
    ce = F.cross_entropy(flat, t, weight=cw, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    if token_scaling:  # Liger: times the detached probability of the label
        ce = ce * torch.softmax(flat, -1).gather(1, torch.where(keep, t, 0)[:, None])[:, 0].detach()
    lse = torch.logsumexp(flat, -1)
    z = torch.where(keep, z_loss * lse**2, torch.zeros_like(lse))
    if reduction == "none":
        return (ce + z).reshape(y.shape), z.reshape(y.shape)
    if reduction == "sum":
        return ce.sum() + z.sum(), z.sum()
    ce_den = keep.sum() if cw is None else torch.where(keep, cw[torch.where(keep, t, 0)], 0.0).sum()
    z_mean = z.sum() / keep.sum()
    return ce.sum() / ce_den + z_mean, z_mean


def within(got, gt, same_dtype, atol, rtol, what):
    """|got - gt| <= atol + rtol |gt| + |same_dtype - gt| elementwise (gt float64; same_dtype: plain torch
    in the dtype under test). NaN or inf where gt is finite fails."""
    got, gt, same_dtype = (t.detach().double() for t in (got, gt, same_dtype))
    assert got.shape == gt.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(gt.shape)}"
    err = (got - gt).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    budget = atol + rtol * gt.abs() + (same_dtype - gt).abs()
    bad = err > budget
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} beyond tolerance, worst excess "
                           f"{float((err - budget).max()):.3g}")


def leaves(tensors, dtype, grads):
    """Fresh leaf copies in `dtype` (None stays None); requires_grad where grads[i]."""
    out = []
    for t, g in zip(tensors, grads):
        out.append(None if t is None else t.detach().to(dtype).requires_grad_(g))
    return out


def run_three(base, y, dtype, grads, kw, sw_kw=None, upstream=None, autocast=None):
    """Runs float64 torch, torch in `dtype` and seqwrap in `dtype` on copies of base (h, w, b), backward with
    `upstream` (ones when None) on the loss. Returns per implementation (loss, z, grads list)."""
    results = []
    for impl, dt in (("gt", torch.float64), ("torch", dtype), ("seqwrap", dtype)):
        h, w, b = leaves(base, dt, grads)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None and impl != "gt" else _null()
        with ctx:
            if impl == "gt" and autocast is not None:  # autocast rounds the inputs of F.linear
                h, w, b = (None if t is None else t.detach().to(autocast).double().requires_grad_(t.requires_grad)
                           for t in (h, w, b))
            if impl == "seqwrap":
                out = seqwrap.linear_cross_entropy(h, w, y, b, return_z_loss=True, **kw, **(sw_kw or {}))
                loss, z = out
            else:
                loss, z = reference(h, w, b, y, **_ref_kw(kw))
        up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
        params = [t for t in (h, w, b) if t is not None and t.requires_grad]
        got = torch.autograd.grad(loss, params, up) if params else ()
        results.append((loss, z, list(got)))
    return results


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _ref_kw(kw):
    keys = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "ce_weight", "shift")
    out = {k: kw[k] for k in keys if k in kw}
    out["token_scaling"] = kw.get("use_token_scaling", False)
    return out


def compare(results, atol, rtol, names):
    (gl, gz, gg), (tl, tz, tg), (sl, sz, sg) = results
    within(sl, gl, tl, atol, rtol, "loss")
    within(sz, gz, tz, atol, rtol, "z_loss")
    assert len(sg) == len(gg)
    for s, g, t, n in zip(sg, gg, tg, names):
        within(s, g, t, atol, rtol, f"grad {n}")


def liger_inputs(B, T, H, V, dtype, bias, ignore_index, scalar=1.0, seed=0):
    """Liger's draws: weight, bias uniform [0, 1); hidden normal * scalar; a random number of ignored rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(V, H, generator=g).to(dtype)
    b = torch.rand(V, generator=g).to(dtype) if bias else None
    x = (torch.randn(B * T, H, generator=g) * scalar).to(dtype)
    y = torch.randint(0, V, (B * T,), generator=g)
    n_ign = int(torch.randint(1, B * T // 2, (1,), generator=g))
    y[torch.randperm(B * T, generator=g)[:n_ign]] = ignore_index
    return x, w, b, y


# -- Liger-Kernel -------------------------------------------------------------------------------------------
# (8, 128, 1024, 4096) shrunk to (2, 16, 64, 256) for the CPU; (4, 47, 31, 123) as in Liger.
LIGER_SHAPES = [(2, 16, 64, 256), (4, 47, 31, 123)]
LIGER_RED_DTYPE = [("mean", torch.bfloat16, 5e-3, 5e-2), ("mean", torch.float32, 1e-5, 5e-4),
                   ("sum", torch.bfloat16, 5e-0, 5e1), ("sum", torch.float32, 1e-3, 5e-2)]
LIGER_OPTS = [  # has_ce_weight, label_smoothing, ignore_index, lse_square_scale, softcap, return_z_loss, accum_dtype
    (False, 0.0, -100, 0.0, None, False, None),
    (True, 0.1, 42, 1e-4, 30.0, True, torch.float32),
]
# accum_dtype: seqwrap always accumulates grad_weight in float32 (float64 for float64): both values run alike.


def _liger_kw(reduction, opts, V, seed=1):
    has_w, smoothing, ign, zscale, cap, _ret_z, _accum = opts
    cw = torch.rand(V, generator=torch.Generator().manual_seed(seed)) if has_w else None
    return dict(ignore_index=ign, reduction=reduction, label_smoothing=smoothing, z_loss=zscale, softcap=cap,
                ce_weight=cw)


@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=str)
@pytest.mark.parametrize("reduction, dtype, atol, rtol", LIGER_RED_DTYPE, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", LIGER_OPTS, ids=["plain", "all_options"])
def test_liger_correctness(shape, reduction, dtype, atol, rtol, bias, opts):
    B, T, H, V = shape
    x, w, b, y = liger_inputs(B, T, H, V, torch.float32, bias, opts[2])
    kw = _liger_kw(reduction, opts, V)
    res = run_three((x, w, b), y, dtype, (True, True, bias), kw, sw_kw=dict(chunk_size=8))
    compare(res, atol, rtol, ("hidden", "weight", "bias"))


@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=str)
@pytest.mark.parametrize("reduction, dtype, atol, rtol", LIGER_RED_DTYPE, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", LIGER_OPTS, ids=["plain", "all_options"])
def test_liger_forward_only(shape, reduction, dtype, atol, rtol, bias, opts):
    B, T, H, V = shape
    x, w, b, y = liger_inputs(B, T, H, V, torch.float32, bias, opts[2], seed=2)
    kw = _liger_kw(reduction, opts, V)
    outs = []
    for dt in (torch.float64, dtype):
        h, ww, bb = leaves((x, w, b), dt, (True, True, bias))
        with torch.no_grad():
            outs.append(reference(h, ww, bb, y, **_ref_kw(kw)))
            if dt == dtype:
                sw = seqwrap.linear_cross_entropy(h, ww, y, bb, return_z_loss=opts[5], chunk_size=8, **kw)
    loss, z = sw if opts[5] else (sw, None)
    (gl, gz), (tl, tz) = outs
    within(loss, gl, tl, atol, rtol, "loss")
    if z is not None:
        within(z, gz, tz, atol, rtol, "z_loss")
    assert not loss.requires_grad  # Liger: backward of a no-grad output raises "does not require grad"
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward(torch.rand_like(loss))


@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)], ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)], ids=str)
@pytest.mark.parametrize("has_ce_weight", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_liger_functional(shape, dtype, atol, rtol, has_ce_weight, bias):
    """Liger's functional call: normal weight/bias/ce_weight (class weights may be negative), z-loss 1e-4,
    smoothing 0.1, softcap 30, mean, z-loss returned; backward of the loss with a random upstream, grad of
    the hidden states only (weight and bias are constants)."""
    B, T, H, V = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * T, H, generator=g)
    y = torch.randint(0, V, (B * T,), generator=g)
    w = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    cw = torch.randn(V, generator=g) if has_ce_weight else None
    kw = dict(ignore_index=-100, reduction="mean", label_smoothing=0.1, z_loss=1e-4, softcap=30.0, ce_weight=cw)
    up = torch.randn((), generator=g)
    res = run_three((x, w, b), y, dtype, (True, False, False), kw, sw_kw=dict(chunk_size=5), upstream=up)
    compare(res, atol, rtol, ("hidden",))


@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_token_accuracy", [True, False])
def test_liger_token_accuracy(shape, dtype, atol, rtol, bias, return_token_accuracy):
    x, w, b, y = liger_inputs(*shape, torch.float32, bias, -100, seed=4)
    kw = dict(ignore_index=-100, reduction="mean")
    stats = dict(return_token_accuracy=True, return_predicted_tokens=True) if return_token_accuracy else {}
    gt_loss, _ = reference(*leaves((x, w, b), torch.float64, (False,) * 3), y, **kw)
    same_loss, _ = reference(*leaves((x, w, b), dtype, (False,) * 3), y, **kw)
    params = leaves((x, w, b), dtype, (True, True, bias))
    out = seqwrap.linear_cross_entropy(params[0], params[1], y, params[2], chunk_size=8, **kw, **stats)
    if not return_token_accuracy:
        assert isinstance(out, torch.Tensor) and not isinstance(out, tuple)
        loss = out
    else:
        assert isinstance(out, LinearCrossEntropyOutput) and out.token_accuracy is not None
        loss = out.loss
        with torch.no_grad():
            logits64 = F.linear(x.double(), w.double(), None if b is None else b.double())
        keep = y != -100
        top2 = logits64.topk(2, -1).values
        # rows whose top-2 gap is beyond the dtype's rounding of the logits: there the argmax is determined
        clear = (top2[:, 0] - top2[:, 1]) > (3e-2 if dtype == torch.bfloat16 else 1e-4) * top2[:, 0].abs().clamp(min=1)
        pred = out.predicted_tokens
        assert pred.dtype == torch.int64 and pred.shape == y.shape
        assert torch.equal(pred[clear], logits64.argmax(-1)[clear]), "predicted tokens differ where the top-2 gap is clear"
        want_acc = ((logits64.argmax(-1) == y) & keep).sum().double() / keep.sum()
        unclear = (~clear & keep).sum().item() / keep.sum().item()  # each such row may flip one hit
        torch.testing.assert_close(out.token_accuracy.double(), want_acc, atol=atol + unclear, rtol=rtol)
        torch.testing.assert_close(out.token_accuracy.double(), ((pred == y) & keep).sum().double() / keep.sum())
    within(loss, gt_loss, same_loss, atol, rtol, "loss")
    loss.backward()
    gt = leaves((x, w, b), torch.float64, (True, True, bias))
    same = leaves((x, w, b), dtype, (True, True, bias))
    for ref_params in (gt, same):
        reference(*ref_params, y, **kw)[0].backward()
    for name, s, g, t in zip(("hidden", "weight", "bias"), params, gt, same):
        if s is not None:
            within(s.grad, g.grad, t.grad, atol, rtol, f"grad {name}")


@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("accum_dtype", [None, torch.float32], ids=str)
def test_liger_amp(shape, bias, cast_dtype, accum_dtype):
    """float32 parameters under torch.autocast(cast_dtype): the loss and float32 gradients, against float64
    on the autocast-rounded inputs; tolerance 5e-3 / 5e-2 as Liger's."""
    B, T, H, V = shape
    g = torch.Generator().manual_seed(5)
    w = torch.rand(V, H, generator=g)
    b = torch.rand(V, generator=g) if bias else None
    x = torch.randn(B * T, H, generator=g)
    y = torch.randint(0, V, (B * T,), generator=g)
    res = run_three((x, w, b), y, torch.float32, (True, True, bias), dict(reduction="mean"),
                    sw_kw=dict(chunk_size=8), autocast=cast_dtype)
    compare(res, 5e-3, 5e-2, ("hidden", "weight", "bias"))


@pytest.mark.parametrize("case", ["none", "sum", "sum_functional", "sum_module", "sum_ignore_index"])
def test_liger_token_scaling(case):
    """Liger's token-scaling tests (B, T, H, V = 2, 4, 8, 16; the ignore-index one: 6 rows, V=1000, two
    ignored), float32, tolerance 1e-4 / 1e-4 (1e-5 for the functional/module ones); seqwrap has one API, so
    'functional' and 'module' run the same call on fresh draws."""
    g = torch.Generator().manual_seed(["none", "sum", "sum_functional", "sum_module", "sum_ignore_index"].index(case))
    if case == "sum_ignore_index":
        H, V = 8, 1000
        y = torch.tensor([0, 100, -100, 500, -100, 999])
        x = torch.randn(6, H, generator=g)
    else:
        H, V = 8, 16
        x = torch.randn(8, H, generator=g)
        y = torch.randint(0, V, (8,), generator=g)
    w, b = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    reduction = "none" if case == "none" else "sum"
    tol = 1e-4 if case in ("none", "sum", "sum_ignore_index") else 1e-5
    up = torch.ones(len(y)) if reduction == "none" else None
    res = run_three((x, w, b), y, torch.float32, (True, False, False),
                    dict(reduction=reduction, use_token_scaling=True), sw_kw=dict(chunk_size=3), upstream=up)
    compare(res, tol, tol, ("hidden",))
    assert torch.isfinite(res[2][0]).all() and torch.isfinite(res[2][2][0]).all()


@pytest.mark.parametrize("return_z_loss, return_token_accuracy", list(itertools.product([False, True], repeat=2)))
def test_liger_structured_output(return_z_loss, return_token_accuracy):
    """Liger's fixed 3x2 example. seqwrap's forms: a tensor; (loss, z_loss) for return_z_loss alone; a
    LinearCrossEntropyOutput (fields None where not asked) once a statistic is asked for."""
    h = torch.tensor([[0.2, -0.1], [1.0, 0.5], [-0.3, 0.7]], requires_grad=True)
    w = torch.tensor([[0.5, -0.4], [-0.2, 0.3], [0.1, 0.6]])
    b = torch.tensor([0.1, -0.2, 0.05])
    y = torch.tensor([0, 1, 2])
    out = seqwrap.linear_cross_entropy(h, w, y, b, return_z_loss=return_z_loss,
                                       return_token_accuracy=return_token_accuracy)
    logits = (h.double() @ w.double().t() + b.double()).detach()
    want = F.cross_entropy(logits, y)
    if not return_token_accuracy:
        loss = out[0] if return_z_loss else out
        if return_z_loss:
            assert isinstance(out, tuple) and len(out) == 2 and float(out[1].detach()) == 0.0
        else:
            assert isinstance(out, torch.Tensor)
    else:
        assert isinstance(out, LinearCrossEntropyOutput)
        loss = out.loss
        assert (out.z_loss is not None) == return_z_loss
        acc = (logits.argmax(-1) == y).double().mean()
        torch.testing.assert_close(out.token_accuracy.double(), acc, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=0)
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


# -- CCE (apple/ml-cross-entropy) ---------------------------------------------------------------------------
# shapes (N, V, D) as CCE's; e (N, D) viewed as (4, N/4, D); CCE's c[: min(N,V)//2] = e[...] makes some
# logits large on the diagonal.
CCE_SHAPES = [(256, 512, 128), (252, 507, 128), (252, 507, 123)]


def cce_inputs(shape, dtype, has_bias, invalids, seed):
    N, V, D = shape
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(N, D, generator=g) / D**0.5).to(dtype)
    c = torch.randn(V, D, generator=g).to(dtype)
    c[: min(N, V) // 2] = e[: min(N, V) // 2]
    y = torch.randint(0, V, (N,), generator=g)
    if invalids:
        y[torch.randperm(N, generator=g)[: int(0.2 * N)]] = -100
    bias = (torch.randn(V, generator=g) * 0.02).to(dtype) if has_bias else None
    return e.view(4, -1, D), c, bias, y.view(4, -1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("invalids", [False, True])
@pytest.mark.parametrize("shape", CCE_SHAPES, ids=str)
def test_cce_forward(dtype, tol, softcap, has_bias, shift, invalids, shape):
    e, c, bias, y = cce_inputs(shape, dtype, has_bias, invalids, seed=6)
    kw = dict(softcap=softcap, shift=shift, reduction="none")
    with torch.no_grad():
        gt, _ = reference(e.double(), c.double(), None if bias is None else bias.double(), y, **kw)
        same, _ = reference(e, c, bias, y, **kw)
        got = seqwrap.linear_cross_entropy(e, c, y, bias, chunk_size=64, **kw)
    assert got.shape == (4, y.shape[1] - shift)
    within(got, gt, same, tol, 0.0, "loss")


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("invalids", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", CCE_SHAPES, ids=str)
def test_cce_backward(softcap, has_bias, shift, invalids, reduction, shape):
    """bf16 (CCE's list sliced to it), error tolerance 1e-2 over plain bf16 torch's own error; CCE's
    upstream: loss.mean(), "sum" divided by the count of valid targets first."""
    dtype = torch.bfloat16
    e, c, bias, y = cce_inputs(shape, dtype, has_bias, invalids, seed=7)
    n_valid = (y != -100).count_nonzero()
    grads = []
    for impl, dt in (("gt", torch.float64), ("torch", dtype), ("seqwrap", dtype)):
        ee, cc, bb = leaves((e, c, bias), dt, (True, True, True))
        kw = dict(softcap=softcap, shift=int(shift), reduction=reduction)
        if impl == "seqwrap":
            loss = seqwrap.linear_cross_entropy(ee, cc, y, bb, chunk_size=64, **kw)
        else:
            loss, _ = reference(ee, cc, bb, y, **kw)
        if reduction == "sum":
            loss = loss / n_valid
        params = [t for t in (ee, cc, bb) if t is not None]
        grads.append(torch.autograd.grad(loss.mean(), params))
    for i, (g, t, s) in enumerate(zip(*grads)):
        within(s, g, t, 1e-2, 0.0, f"grad {('e', 'c', 'bias')[i]}")


@pytest.mark.parametrize("compute_de, compute_dc, compute_dbias", [(True, False, True), (False, True, False),
                                                                    (False, False, True)])
def test_cce_partials(compute_de, compute_dc, compute_dbias):
    """Only the gradients asked for are formed (and they are right)."""
    e, c, bias, y = cce_inputs((256, 512, 128), torch.bfloat16, True, False, seed=8)
    bias = bias / 0.02 * 0.01  # CCE's 0.01 bias scale here
    need = (compute_de, compute_dc, compute_dbias)
    sw = leaves((e, c, bias), torch.bfloat16, need)
    seqwrap.linear_cross_entropy(sw[0], sw[1], y, sw[2], chunk_size=64).backward()
    gt = leaves((e, c, bias), torch.float64, need)
    same = leaves((e, c, bias), torch.bfloat16, need)
    for ps in (gt, same):
        reference(*ps, y)[0].backward()
    for s, g, t, n in zip(sw, gt, same, need):
        assert (s.grad is not None) == n
        if n:
            within(s.grad, g.grad, t.grad, 1e-2, 0.0, "grad")
