"""chunked_attention with no output element (batch, query heads, T or head_dim 0) returns an
empty result like SDPA, with zero gradients for k and v (issue 16, item 4 and its unclear
errors). Before, zero query heads reached torch's CPU flash kernel and died with SIGFPE, so
the cases run in a child interpreter."""
import pytest

from .isolated import run_isolated

pytestmark = pytest.mark.ccore

SHAPES = [  # q shape, k/v shape
    ((1, 0, 4, 2), (1, 1, 4, 2)),   # zero query heads (the SIGFPE)
    ((1, 0, 4, 2), (1, 0, 4, 2)),   # zero query and kv heads
    ((1, 2, 4, 0), (1, 2, 4, 0)),   # head_dim 0 (was ZeroDivisionError)
    ((0, 2, 4, 2), (0, 2, 4, 2)),   # batch 0 (was "'acc_out' is empty")
    ((1, 2, 0, 2), (1, 1, 0, 2)),   # empty sequence
]


def test_empty_results_match_sdpa():
    out = run_isolated(f"""
import torch, torch.nn.functional as F
from seqwrap.ops import chunked_attention
for qs, ks in {SHAPES!r}:
    q = torch.randn(qs, requires_grad=True)
    k, v = torch.randn(ks, requires_grad=True), torch.randn(ks, requires_grad=True)
    o = chunked_attention(q, k, v, chunk_size=2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert o.shape == ref.shape and o.dtype == ref.dtype, (qs, o.shape, ref.shape)
    assert o.requires_grad
    o.sum().backward()
    assert q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros(ks)) and torch.equal(v.grad, torch.zeros(ks)), qs
    print("ok", qs)
""")
    assert out.count("ok") == len(SHAPES), out


def test_kv_heads_zero_with_query_heads_is_still_refused():
    import torch

    from seqwrap.ops import chunked_attention

    with pytest.raises(ValueError, match=r"q_heads \(2\) must be a multiple of kv_heads \(0\)"):
        chunked_attention(torch.randn(1, 2, 4, 2), torch.randn(1, 0, 4, 2), torch.randn(1, 0, 4, 2), chunk_size=2)
