"""seqwrap.ops.chunked_attention and the LSE merge kernel against F.scaled_dot_product_attention (float64)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.ops import attention_blocks as blocks_mod
from seqwrap.ops import chunked_attention

from .conftest import requires_cuda

pytestmark = pytest.mark.ccore  # drives the C kernels: rerun under ASan/UBSan


def reference(q, k, v, causal, window, scale=None):
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if window is None:
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, scale=scale)
    i = torch.arange(q.shape[2])
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :]) < window)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=scale)


def check(b, hq, hk, t, d, chunk, causal=True, window=None, scale=None, dtype=torch.float64, tol=1e-12):
    q = torch.randn(b, hq, t, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, t, d, dtype=dtype, requires_grad=True)
    out = chunked_attention(q, k, v, chunk_size=chunk, causal=causal, window=window, scale=scale)
    ref = reference(q, k, v, causal, window, scale)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    for name, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-block", "torch-block"])
@pytest.mark.parametrize(
    "b, hq, hk, t, d, chunk, causal, window",
    [
        (2, 4, 2, 37, 8, 8, True, None),    # GQA, T not a multiple of the chunk
        (1, 2, 2, 16, 4, 5, False, None),   # bidirectional
        (1, 4, 1, 40, 8, 7, True, 11),      # sliding window, MQA
        (1, 2, 2, 33, 4, 4, True, 3),       # window smaller than a chunk: many empty blocks
        (1, 2, 2, 9, 4, 9, True, None),     # one chunk
        (1, 1, 1, 1, 4, 3, True, None),     # one token
    ],
)
def test_matches_sdpa_float64(monkeypatch, fused, b, hq, hk, t, d, chunk, causal, window):
    monkeypatch.setattr(blocks_mod, "_fused_available", lambda _q, softcap: fused and softcap is None)
    check(b, hq, hk, t, d, chunk, causal, window)


def test_custom_scale():
    check(1, 2, 2, 20, 8, 6, scale=0.37)


def test_float32_and_bfloat16():
    check(1, 4, 2, 50, 16, 16, dtype=torch.float32, tol=2e-5)
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    out = chunked_attention(q, k, v, chunk_size=16)
    ref = reference(q.double(), k.double(), v.double(), True, None)
    assert (out.double() - ref).abs().max() < 3e-2


def test_bad_inputs():
    q = torch.randn(1, 4, 8, 4)
    k = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        chunked_attention(q, k, k, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunked_attention(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="needs causal=True"):
        chunked_attention(q, q, q, chunk_size=4, causal=False, window=3)
    with pytest.raises(ValueError, match=r"must be \(batch, heads, T, head_dim\)"):
        chunked_attention(q[0], q, q, chunk_size=4)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_attention(q, q[:, :, :5], q[:, :, :5], chunk_size=4)
    with pytest.raises(TypeError, match="expected a floating dtype"):
        chunked_attention(q.int(), q, q, chunk_size=4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        chunked_attention(q, None, q, chunk_size=4)


class TestLseMerge:
    def test_merge_equals_joint_softmax(self, bridge):
        """Merging two halves' (out, lse) equals attention over all keys; -inf blocks are no-ops."""
        s = torch.randn(6, 10, dtype=torch.float64)
        vals = torch.randn(10, 3, dtype=torch.float64)
        def part(cols):
            lse = torch.logsumexp(s[:, cols], -1)
            return torch.softmax(s[:, cols], -1) @ vals[cols], lse
        acc = torch.zeros(6, 3, dtype=torch.float64)
        acc_lse = torch.full((6,), float("-inf"), dtype=torch.float64)
        for cols in (slice(0, 4), slice(4, 10)):
            o, l = part(cols)
            seqwrap._C.lse_merge(acc, acc_lse, o.contiguous(), l.contiguous(), 0)
        nan_block = torch.full((6, 3), float("nan"), dtype=torch.float64)
        seqwrap._C.lse_merge(acc, acc_lse, nan_block, torch.full((6,), float("-inf"), dtype=torch.float64), 0)
        torch.testing.assert_close(acc, torch.softmax(s, -1) @ vals, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(acc_lse, torch.logsumexp(s, -1), rtol=1e-14, atol=1e-14)

    def test_half_block_into_float32(self, bridge):
        acc = torch.zeros(4, 8)
        lse = torch.full((4,), float("-inf"))
        blk = torch.randn(4, 8, dtype=torch.bfloat16)
        seqwrap._C.lse_merge(acc, lse, blk, torch.zeros(4), 0)
        assert torch.equal(acc, blk.float()) and torch.equal(lse, torch.zeros(4))

    @pytest.mark.parametrize(
        "key, value, exc, pattern",
        [
            ("acc_out", torch.zeros(4, 8, dtype=torch.bfloat16), TypeError, "'acc_out' has dtype bfloat16"),
            ("acc_out", torch.zeros(8, 4).t(), ValueError, "'acc_out' is not contiguous"),
            ("acc_lse", torch.zeros(5), ValueError, r"'acc_lse' has shape \(5,\)"),
            ("acc_lse", torch.zeros(4, dtype=torch.float64), TypeError, "'acc_lse' has dtype float64"),
            ("blk_out", torch.zeros(4, 7), ValueError, r"'blk_out' has shape \(4, 7\)"),
            ("blk_out", torch.zeros(4, 8, dtype=torch.float64), TypeError, "'blk_out' has dtype float64"),
            ("blk_lse", None, TypeError, "'blk_lse' must be a torch.Tensor"),
            ("acc_out", torch.zeros(0, 8), ValueError, "'acc_out' is empty"),
        ],
    )
    def test_bad_arguments(self, bridge, key, value, exc, pattern):
        a = dict(acc_out=torch.zeros(4, 8), acc_lse=torch.zeros(4), blk_out=torch.zeros(4, 8), blk_lse=torch.zeros(4),
                 stream=0)
        a[key] = value
        with pytest.raises(exc, match=pattern):
            seqwrap._C.lse_merge(**a)


@requires_cuda
def test_cuda_matches_reference():
    q, k, v = (torch.randn(1, 4, 70, 16, device="cuda", dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = chunked_attention(q, k, v, chunk_size=16, window=40)
    ref = reference(q, k, v, True, 40)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_cuda_fused_blocks_match_reference(dtype, tol):
    """float32 / bf16 blocks on CUDA run torch's efficient-attention kernel (lse + additive bias),
    not the plain-torch fallback; GQA, a window and a T that is not a multiple of the chunk."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 70, 16, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 70, 16, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    with warnings.catch_warnings():  # a fall back to the plain-torch block warns: make it an error here
        warnings.filterwarnings("error", message=".*fused CUDA attention block", category=RuntimeWarning)
        out = chunked_attention(q, k, v, chunk_size=16, window=40)
        ref = reference(*(t.double() for t in (q, k, v)), True, 40)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        up = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), up.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), up)
    for name, a, r in zip("qkv", got, want):
        err = (a.double() - r).norm() / r.norm()
        assert err < tol, f"grad of {name}: relative error {err:.3g}"
