"""seqwrap.linear_cross_entropy against F.linear + F.cross_entropy (float64 autograd)."""
import pytest
import torch

import seqwrap
from seqwrap.ops.cross_entropy import default_chunk_rows

from seqwrap.ops.reference import linear_cross_entropy_ref
from .conftest import requires_cuda

pytestmark = pytest.mark.ccore  # drives the C kernels: rerun under ASan/UBSan

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0},
]


def make_inputs(lead, H, V, dtype=torch.float64, bias=True, ignore_every=4):
    hidden = torch.randn(*lead, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, dtype=dtype) / H**0.5).requires_grad_()
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, V, lead)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return hidden, weight, b, labels


def grads_of(out, inputs, upstream):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, upstream)


def assert_matches(hidden, weight, bias, labels, *, rtol=1e-12, atol=1e-12, chunk_size=None, **opts):
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk_size, **opts)
    ref, _ = linear_cross_entropy_ref(hidden.double(), weight.double(), labels,
                                            None if bias is None else bias.double(), **opts)
    upstream = torch.randn_like(ref)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    got = grads_of(out, (hidden, weight, bias), upstream.to(out.dtype))
    want = grads_of(ref, (hidden, weight, bias), upstream)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_float64_every_option(reduction, opts):
    hidden, weight, bias, labels = make_inputs((37,), 16, 101)  # V=101 is no multiple of anything
    assert_matches(hidden, weight, bias, labels, reduction=reduction, chunk_size=8, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "lead, H, V, chunk",
    [((1,), 8, 33, None), ((1,), 8, 33, 5), ((2, 9), 12, 50, 4), ((3, 1, 5), 4, 7, 2), ((64,), 16, 300, None)],
)
def test_float64_shapes(lead, H, V, chunk, reduction):
    hidden, weight, bias, labels = make_inputs(lead, H, V, bias=V % 2 == 0)
    assert_matches(hidden, weight, bias, labels, reduction=reduction, chunk_size=chunk)


def test_batch_with_padding_and_custom_ignore_index():
    hidden, weight, bias, labels = make_inputs((2, 11), 8, 40, ignore_every=0)
    labels[0, 7:] = 39      # "padding" class used as ignore_index
    labels[1, 3:] = 39
    assert_matches(hidden, weight, bias, labels, ignore_index=39, reduction="mean", chunk_size=3)


def test_lse_is_returned():
    hidden, weight, bias, labels = make_inputs((5, 3), 8, 21)
    loss, lse = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, softcap=2.0, return_lse=True, chunk_size=4)
    _, ref_lse = linear_cross_entropy_ref(hidden, weight, labels, bias, softcap=2.0)
    assert lse.shape == labels.shape
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-13, atol=1e-13)
    assert not lse.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored_gives_zero_not_nan(reduction):
    hidden, weight, bias, labels = make_inputs((6,), 8, 13)
    labels[:] = -100
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, chunk_size=4)
    assert torch.all(out == 0)
    grads = grads_of(out, (hidden, weight, bias), torch.ones_like(out))
    assert all(torch.all(g == 0) for g in grads)


def test_gradcheck():
    hidden, weight, bias, labels = make_inputs((4,), 3, 6)
    for red in ("mean", "none"):
        f = lambda h, w, b: seqwrap.linear_cross_entropy(h, w, labels, b, reduction=red, chunk_size=3,  # noqa: E731
                                                         label_smoothing=0.1, z_loss=0.01, softcap=4.0)
        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_frozen_weight_and_no_grad():
    hidden, weight, bias, labels = make_inputs((9,), 8, 17, bias=False)
    weight = weight.detach()
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    ref, _ = linear_cross_entropy_ref(hidden, weight, labels)
    (g,) = torch.autograd.grad(out, hidden)
    (r,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        out2 = seqwrap.linear_cross_entropy(hidden, weight, labels)
    assert not out2.requires_grad
    torch.testing.assert_close(out2, ref.detach(), rtol=1e-12, atol=1e-12)


def test_float32_close_to_float64_reference():
    hidden, weight, bias, labels = make_inputs((200,), 64, 1000, dtype=torch.float32)
    assert_matches(hidden, weight, bias, labels, rtol=2e-5, atol=2e-6, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_stated_tolerance(dtype):
    """bf16 / fp16 inputs: logits and gradients are computed and stored in the half type (float32
    softmax accumulation, float32 weight-gradient accumulation across chunks). Against a float64
    reference on the same (rounded) inputs, we state: loss within 1% relative, each gradient
    within 2% relative error in norm (bf16 has 8 mantissa bits: ~0.4% per rounding)."""
    hidden, weight, bias, labels = make_inputs((300,), 64, 500, dtype=dtype)
    out = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, chunk_size=64)
    assert out.dtype == torch.float32
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref, _ = linear_cross_entropy_ref(h64, w64, labels, b64)
    assert abs(out.item() - ref.item()) <= 1e-2 * abs(ref.item())
    got = grads_of(out, (hidden, weight, bias), torch.tensor(1.0))
    want = grads_of(ref, (h64, w64, b64), torch.tensor(1.0, dtype=torch.float64))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < 2e-2, rel


def test_one_chunk_of_logits_at_a_time(monkeypatch):
    """The kernel only ever sees (chunk, V) logits; a full (N, V) matrix is never formed."""
    from seqwrap.ops import library

    seen = []
    real = library.C.cross_entropy_chunk

    class Spy:
        def __getattr__(self, name):
            return getattr(real.__self__ if hasattr(real, "__self__") else library.C, name)

        @staticmethod
        def cross_entropy_chunk(logits, *args):
            seen.append(tuple(logits.shape))
            return real(logits, *args)

    monkeypatch.setattr(library, "C", Spy())
    hidden, weight, bias, labels = make_inputs((50,), 8, 30)
    seqwrap.linear_cross_entropy(hidden, weight, labels, bias, chunk_size=16).backward()
    assert seen == [(16, 30), (16, 30), (16, 30), (2, 30)]


def test_default_chunk_rows():
    assert default_chunk_rows(100000, 1024, 32768) == 512
    assert default_chunk_rows(100000, 4096, 131072) == 128
    assert default_chunk_rows(10, 1024, 32768) == 10
    assert default_chunk_rows(100000, 64, 256) == 65536
    assert default_chunk_rows(100000, 8192, 262144) == 128  # H // 64 floor


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_matches_cpu(dtype):
    hidden, weight, bias, labels = make_inputs((300,), 64, 1000, dtype=dtype)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, chunk_size=64)
    out_cpu = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, **opts)
    g_cpu = grads_of(out_cpu, (hidden, weight, bias), torch.tensor(1.0))
    hc, wc, bc = (t.detach().cuda().requires_grad_() for t in (hidden, weight, bias))
    out_gpu = seqwrap.linear_cross_entropy(hc, wc, labels.cuda(), bc, **opts)
    g_gpu = grads_of(out_gpu, (hc, wc, bc), torch.tensor(1.0, device="cuda"))
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tol, atol=tol)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=tol, atol=tol)


@requires_cuda
def test_cuda_label_out_of_range_raises():
    hidden, weight, bias, labels = make_inputs((10,), 8, 20)
    labels[3] = 20
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        seqwrap.linear_cross_entropy(hidden.cuda(), weight.cuda(), labels.cuda(), bias.cuda())


def test_no_grad_forms_no_gradients(monkeypatch):
    """Under no_grad (or with inputs that need none) only the loss is computed: the same value, and
    none of the gradient products (the chunk loop is asked for no gradient)."""
    from seqwrap.ops import cross_entropy as ce

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[3] = -100
    asked = []
    real = ce._chunked_pass

    def spy(*args, need, **kw):
        asked.append(need)
        return real(*args, need=need, **kw)

    monkeypatch.setattr(ce, "_chunked_pass", spy)
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            got = seqwrap.linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=8)
        want = torch.nn.functional.cross_entropy(hidden @ weight.detach().t(), labels, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not got.requires_grad
    assert asked == [(False, False, False)] * 3
    seqwrap.linear_cross_entropy(hidden, weight, labels)  # with grad: the weight gradient is formed
    assert asked[-1] == (False, True, False)
