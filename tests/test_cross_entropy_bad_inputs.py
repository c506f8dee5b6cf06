"""Bad inputs of linear_cross_entropy and of its C entry point raise clear errors."""
import numpy as np
import pytest
import torch

import seqwrap

C = seqwrap._C


def inputs(N=6, H=4, V=9):
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize(
    "bad_label, pattern",
    [(9, r"label 9 at position 3 is outside \[0, 9\)"), (-1, r"label -1 at position 3 is outside"),
     (1 << 40, r"is outside \[0, 9\)")],
)
def test_label_out_of_range(bad_label, pattern):
    h, w, y = inputs()
    y[3] = bad_label
    with pytest.raises(ValueError, match=pattern):
        seqwrap.linear_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match=pattern):
        seqwrap.linear_cross_entropy(h, w, y, chunk_size=2, reduction="none")


def test_custom_ignore_index_makes_minus_100_a_bad_label():
    h, w, y = inputs()
    y[0] = -100
    with pytest.raises(ValueError, match=r"label -100 at position 0 .* not ignore_index \(-1\)"):
        seqwrap.linear_cross_entropy(h, w, y, ignore_index=-1)


@pytest.mark.parametrize(
    "change, exc, pattern",
    [
        (lambda h, w, y: (h.tolist(), w, y), TypeError, "'hidden' must be a torch.Tensor, not list"),
        (lambda h, w, y: (h.int(), w, y), TypeError, "'hidden' has dtype torch.int32"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "must have the dtype of 'hidden'"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "'labels' must hold integer class indices"),
        (lambda h, w, y: (h, w[:, :3], y), ValueError, r"must be \(\.\.\., H\)"),
        (lambda h, w, y: (h, w[0], y), ValueError, r"must be \(\.\.\., H\)"),
        (lambda h, w, y: (h, w, y[:5]), ValueError, r"'labels' has shape \(5,\) but 'hidden' needs \(6,\)"),
        (lambda h, w, y: (h[:0], w, y[:0]), ValueError, "holds no tokens"),
        (lambda h, w, y: (h, w[:0], y), ValueError, "'weight' must be non-empty"),
    ],
)
def test_bad_tensors(change, exc, pattern):
    h, w, y = change(*inputs())
    with pytest.raises(exc, match=pattern):
        seqwrap.linear_cross_entropy(h, w, y)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ({"z_loss": -1.0}, ValueError, "z_loss must be a finite number >= 0"),
        ({"z_loss": float("nan")}, ValueError, "z_loss must be a finite number >= 0"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or a finite number > 0"),
        ({"softcap": float("inf")}, ValueError, "softcap must be None or a finite number > 0"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, ValueError, "chunk_size must be a positive int"),
        ({"ignore_index": None}, TypeError, "ignore_index must be an int"),
        ({"bias": torch.zeros(8)}, ValueError, r"'bias' has shape \(8,\); expected \(9,\)"),
        ({"bias": [0.0] * 9}, TypeError, "'bias' must be a torch.Tensor or None"),
    ],
)
def test_bad_options(kwargs, exc, pattern):
    h, w, y = inputs()
    with pytest.raises(exc, match=pattern):
        seqwrap.linear_cross_entropy(h, w, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"ignore_index": 2**63}, ValueError, r"ignore_index must fit int64"),
        ({"ignore_index": -(2**63) - 1}, ValueError, r"ignore_index must fit int64"),
        ({"label_smoothing": "a"}, TypeError, r"label_smoothing must be a real number, not 'a'"),
        ({"label_smoothing": None}, TypeError, r"label_smoothing must be a real number, not None"),
        ({"label_smoothing": True}, TypeError, r"label_smoothing must be a real number"),
        ({"z_loss": None}, TypeError, r"z_loss must be a real number, not None"),
        ({"z_loss": "0.1"}, TypeError, r"z_loss must be a real number"),
        ({"softcap": "30"}, TypeError, r"softcap must be None or a finite number > 0, not '30'"),
    ],
)
def test_option_type_and_range_errors_name_the_argument(kwargs, exc, pattern):
    h, w, y = inputs()
    with pytest.raises(exc, match=pattern):
        seqwrap.linear_cross_entropy(h, w, y, **kwargs)


def test_numpy_scalars_are_accepted_as_options():
    h, w, y = inputs()
    ref = seqwrap.linear_cross_entropy(h, w, y, label_smoothing=0.25, z_loss=1e-3, softcap=20.0)
    got = seqwrap.linear_cross_entropy(h, w, y, label_smoothing=np.float32(0.25), z_loss=np.float64(1e-3),
                                       softcap=np.float32(20.0), ignore_index=-100)
    torch.testing.assert_close(got, ref)


@pytest.mark.ccore
class TestKernelEntryPoint:
    """The C glue checks its own arguments (it is reachable as seqwrap._C.cross_entropy_chunk)."""

    def args(self, rows=4, V=7, dtype=torch.float32):
        real = torch.float64 if dtype == torch.float64 else torch.float32
        return dict(logits=torch.randn(rows, V, dtype=dtype), labels=torch.randint(0, V, (rows,)),
                    loss=torch.empty(rows, dtype=real), lse=torch.empty(rows, dtype=real), grad_scale=None,
                    ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0, compute_grad=True,
                    error_flag=None, stream=0)

    def test_good_call(self, bridge):
        a = self.args()
        ref = torch.softmax(a["logits"], -1)
        ref[torch.arange(4), a["labels"]] -= 1
        C.cross_entropy_chunk(**a)
        torch.testing.assert_close(a["logits"], ref)

    @pytest.mark.parametrize(
        "key, value, exc, pattern",
        [
            ("logits", torch.randn(7), ValueError, r"'logits' must be a non-empty \(rows, V\) matrix"),
            ("logits", torch.randn(4, 0), ValueError, r"'logits' must be a non-empty"),
            ("logits", torch.randn(7, 4).t(), ValueError, "'logits' is not contiguous"),
            ("logits", torch.randn(4, 7).int(), TypeError, "'logits' has dtype int32"),
            ("logits", torch.randn(4, 7, requires_grad=True), ValueError, "'logits' requires grad"),
            ("labels", torch.randint(0, 7, (3,)), ValueError, r"'labels' must have shape \(4,\)"),
            ("labels", torch.randint(0, 7, (4,)).int(), TypeError, "'labels' has dtype int32; expected int64"),
            ("labels", torch.tensor([0, 1, 7, 2]), ValueError, r"label 7 at position 2 is outside \[0, 7\)"),
            ("loss", torch.empty(4, dtype=torch.float64), TypeError, "'loss' has dtype float64; expected float32"),
            ("lse", torch.empty(5), ValueError, r"'lse' must have shape \(4,\)"),
            ("lse", "nope", TypeError, "'lse' must be a torch.Tensor, not str"),
            ("grad_scale", torch.ones(4, dtype=torch.float16), TypeError, "'grad_scale' has dtype float16"),
            ("label_smoothing", 2.0, ValueError, r"label_smoothing must be in \[0, 1\], got 2"),
            ("z_loss", -1.0, ValueError, "z_loss must be a finite number >= 0"),
            ("softcap", float("nan"), ValueError, "softcap must be a finite number"),
        ],
    )
    def test_bad_argument(self, bridge, key, value, exc, pattern):
        a = self.args()
        before = a["logits"].clone()
        a[key] = value
        with pytest.raises(exc, match=pattern):
            C.cross_entropy_chunk(**a)
        if key != "logits":
            assert torch.equal(a["logits"], before), "nothing may be written on a rejected call"

    def test_missing_argument(self):
        a = self.args()
        del a["stream"]
        with pytest.raises(TypeError):
            C.cross_entropy_chunk(**a)
