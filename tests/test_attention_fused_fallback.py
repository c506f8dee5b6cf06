"""A failure of torch's fused CUDA attention block affects that one call: the call is redone by
the plain-torch block with a warning, and the next call tries the fused kernel again (issue 10,
item 2). Tested on the CPU by standing in for the CUDA kernel with monkeypatch."""
import types

import pytest
import torch
import torch.nn.functional as F

from seqwrap.ops import attention_blocks as blocks
from seqwrap.ops import chunked_attention

pytestmark = pytest.mark.ccore  # drives the LSE merge kernel


class FlakyFused:
    """Stands in for _cuda_block_forward / _cuda_block_backward: raises `error` on the calls whose
    numbers are in `fail_on`, and otherwise computes the block with torch's CPU fused kernel."""

    def __init__(self, fail_on, error=None):
        self.fail_on, self.calls, self.fused = set(fail_on), 0, 0
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def _maybe_fail(self):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.error
        self.fused += 1

    def forward(self, q, k, v, mask, scale):
        self._maybe_fail()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                             scale=scale)
        if mask is not None:
            lse = lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        self._maybe_fail()
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Routes CPU blocks through the 'CUDA fused' branch (the real availability rule, asked about a
    stand-in that says it is on CUDA); returns a function installing the fake kernels."""
    real_rule = blocks._cuda_fused_available
    monkeypatch.setattr(blocks, "_cuda_fused_available", lambda q, softcap: real_rule(
        types.SimpleNamespace(is_cuda=True, dtype=q.dtype, shape=q.shape), softcap))

    def install(fwd: FlakyFused, bwd: FlakyFused):
        monkeypatch.setattr(blocks, "_cuda_block_forward", fwd.forward)
        monkeypatch.setattr(blocks, "_cuda_block_backward", bwd.backward)
    return install


def inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 40, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 8, generator=g, requires_grad=True) for _ in range(2))
    return q, k, v


def reference(q, k, v):
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return ref, torch.autograd.grad(ref.sum(), (q, k, v))


def test_one_failed_forward_block_falls_back_for_that_call_only(fake_cuda):
    fwd, bwd = FlakyFused(fail_on={2}), FlakyFused(fail_on=set())
    fake_cuda(fwd, bwd)
    q, k, v = inputs()
    with pytest.warns(RuntimeWarning, match=r"fused CUDA attention block \(forward\) failed for this call"):
        out = chunked_attention(q, k, v, chunk_size=10)
    blocks_per_pass = 10  # 4 q chunks, causal: 1 + 2 + 3 + 4 blocks
    assert fwd.calls == blocks_per_pass and fwd.fused == blocks_per_pass - 1
    ref, ref_grads = reference(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert bwd.fused == blocks_per_pass  # the backward still runs the fused kernel
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the next call uses the fused kernel for every block again
    chunked_attention(q, k, v, chunk_size=10)
    assert fwd.fused == 2 * blocks_per_pass - 1


def test_one_failed_backward_block_falls_back_for_that_call_only(fake_cuda):
    fwd, bwd = FlakyFused(fail_on=set()), FlakyFused(fail_on={1, 7})
    fake_cuda(fwd, bwd)
    q, k, v = inputs()
    out = chunked_attention(q, k, v, chunk_size=10)
    with pytest.warns(RuntimeWarning, match=r"\(backward\) failed for this call"):
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert bwd.calls == 10 and bwd.fused == 8
    _, ref_grads = reference(q, k, v)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    chunked_attention(q, k, v, chunk_size=10)
    assert fwd.fused == 20


def test_errors_that_are_not_kernel_failures_propagate(fake_cuda):
    # only a RuntimeError of the fused call is redone; anything else is not hidden
    fake_cuda(FlakyFused(fail_on={1}, error=ValueError("not a kernel failure")), FlakyFused(fail_on=set()))
    q, k, v = inputs()
    with pytest.raises(ValueError, match="not a kernel failure"):
        chunked_attention(q, k, v, chunk_size=10)


def test_a_failing_fallback_is_not_hidden(fake_cuda, monkeypatch):
    fake_cuda(FlakyFused(fail_on={1}), FlakyFused(fail_on=set()))
    monkeypatch.setattr(blocks, "_fused_available", lambda q, softcap: False)

    def broken_scores(*args, **kwargs):
        raise RuntimeError("the plain-torch block failed too")
    monkeypatch.setattr(blocks, "_scores", broken_scores)
    q, k, v = inputs()
    with pytest.warns(RuntimeWarning, match="failed for this call"):
        with pytest.raises(RuntimeError, match="the plain-torch block failed too"):
            chunked_attention(q, k, v, chunk_size=10)
