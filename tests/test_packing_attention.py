"""chunked_attention on packed rows against SDPA run on every document alone (float64), the block
skipping, and the boundary conventions with their errors."""
import pytest
import torch
import torch.nn.functional as F

from seqwrap.ops import attention_blocks as blocks_mod
from seqwrap.ops import chunked_attention
from seqwrap.ops.documents import Documents, resolve

pytestmark = pytest.mark.ccore  # drives the LSE merge kernel: rerun under ASan/UBSan

LENGTHS = [[5, 12, 1, 19], [20, 17]]   # 2 rows of 37 tokens: a 1-token document, one longer than a chunk
TOL = 1e-12


def cu_of(lengths):
    return torch.tensor([0] + [n for row in lengths for n in row]).cumsum(0)


def per_document_sdpa(q, k, v, lengths, window=None, causal=True):
    """SDPA over every document on its own. q (B, Hq, T, D), k, v (B, Hkv, T, D)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for b, row in enumerate(lengths):
        s = 0
        for n in row:
            i = torch.arange(n)
            allowed = (i[None] <= i[:, None]) if causal else torch.ones(n, n, dtype=torch.bool)
            if window is not None:
                allowed = allowed & ((i[:, None] - i[None]) < window)
            sl = slice(s, s + n)
            out[b:b + 1, :, sl] = F.scaled_dot_product_attention(
                q[b:b + 1, :, sl], k[b:b + 1, :, sl].repeat_interleave(groups, 1),
                v[b:b + 1, :, sl].repeat_interleave(groups, 1), attn_mask=allowed)
            s += n
    return out


def inputs(lengths, hq=4, hk=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), sum(lengths[0])
    mk = lambda h: torch.randn(b, h, t, d, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(hq), mk(hk), mk(hk)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-block", "torch-block"])
@pytest.mark.parametrize("chunk", [4, 5, 8, 40])
@pytest.mark.parametrize("window", [None, 3, 7])
def test_matches_per_document_sdpa(monkeypatch, fused, chunk, window):
    monkeypatch.setattr(blocks_mod, "_fused_available", lambda _q, softcap: fused and softcap is None)
    q, k, v = inputs(LENGTHS)
    out = chunked_attention(q, k, v, chunk_size=chunk, window=window, cu_seqlens=cu_of(LENGTHS))
    ref = per_document_sdpa(q, k, v, LENGTHS, window)
    torch.testing.assert_close(out, ref, rtol=TOL, atol=TOL)
    g = torch.randn_like(out)
    for name, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r, rtol=TOL, atol=TOL, msg=lambda m: f"grad of {name}: {m}")


def test_bidirectional_inside_documents():
    q, k, v = inputs(LENGTHS, seed=3)
    out = chunked_attention(q, k, v, chunk_size=6, causal=False, cu_seqlens=cu_of(LENGTHS))
    torch.testing.assert_close(out, per_document_sdpa(q, k, v, LENGTHS, causal=False), rtol=TOL, atol=TOL)


def test_conventions_agree():
    """cu_seqlens, seq_idx, restarting position_ids and a Documents object give the same result."""
    q, k, v = inputs(LENGTHS, seed=1)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    seq = torch.stack([torch.cat([torch.full((n,), 7 * d) for d, n in enumerate(row)]) for row in LENGTHS])
    ref = chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu_of(LENGTHS))
    for kw in (dict(position_ids=pos), dict(seq_idx=seq), dict(documents=Documents.from_position_ids(pos)),
               dict(cu_seqlens=cu_of(LENGTHS).tolist())):
        assert torch.equal(chunked_attention(q, k, v, chunk_size=8, **kw), ref), kw
    # the boundaries matter: without them the rows are one causal sequence each
    plain = chunked_attention(q, k, v, chunk_size=8)
    assert (plain - ref).abs().max() > 0.1


def test_empty_blocks_are_never_computed(monkeypatch):
    """A block with no shared document is not computed in forward or backward."""
    lengths = [[8, 8, 8, 8]]
    q, k, v = inputs(lengths, seed=2)
    calls = []
    real_forward, real_backward = blocks_mod.block_forward, blocks_mod.block_backward
    monkeypatch.setattr(blocks_mod, "block_forward", lambda *a, **kw: calls.append("f") or real_forward(*a, **kw))
    monkeypatch.setattr(blocks_mod, "block_backward", lambda *a, **kw: calls.append("b") or real_backward(*a, **kw))
    out = chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu_of(lengths))
    out.sum().backward()
    assert calls.count("f") == 4 and calls.count("b") == 4  # only the 4 diagonal blocks of 10 causal ones
    docs = Documents.from_cu_seqlens(cu_of(lengths), 1, 32)
    assert docs.block_counts([(s, s + 8) for s in range(0, 32, 8)]) == (10, 6)
    calls.clear()
    chunked_attention(q, k, v, chunk_size=8).sum().backward()
    assert calls.count("f") == 10


def test_documents_layout_helpers():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    docs = Documents.from_position_ids(pos)
    assert docs.packed and docs.count() == 4 and docs.lengths() == [3, 2, 1, 6]
    assert docs.cu_seqlens().tolist() == [0, 3, 5, 6, 12]
    assert torch.equal(docs.positions(), pos)
    assert docs.ends().tolist() == [[False, False, True, False, True, False], [False] * 6]
    assert docs.continues(2) and docs.continues(3) and not docs.continues(6)
    assert resolve((2, 6), position_ids=torch.arange(6).expand(2, 6)) is None   # one document per row
    assert resolve((2, 6), cu_seqlens=[0, 6, 12]) is None


def test_bad_boundaries():
    q, k, v = inputs(LENGTHS)
    cu = cu_of(LENGTHS)
    with pytest.raises(ValueError, match="must cover every row"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="must start at 0"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu + 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=torch.tensor([0, 5, 5, 74]))
    with pytest.raises(ValueError, match="crosses from row 0 into row 1"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=torch.tensor([0, 30, 74]))
    with pytest.raises(ValueError, match="1-D integer"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu.double())
    with pytest.raises(ValueError, match="non-decreasing along each row"):
        chunked_attention(q, k, v, chunk_size=8, seq_idx=torch.tensor([[0] * 20 + [1] * 17, [1] * 20 + [0] * 17]))
    with pytest.raises(ValueError, match=r"shape \(2, 37\)"):
        chunked_attention(q, k, v, chunk_size=8, seq_idx=torch.zeros(2, 36, dtype=torch.long))
    pos = torch.arange(37).expand(2, 37).clone()
    pos[0, 3] = 0  # a restart inside the first document
    with pytest.raises(ValueError, match="position_ids contradict cu_seqlens: tokens 2 and 3 of row 0"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu, position_ids=pos)
    seq = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in [[5, 32], [20, 17]]])
    with pytest.raises(ValueError, match="seq_idx and cu_seqlens describe different document boundaries"):
        chunked_attention(q, k, v, chunk_size=8, cu_seqlens=cu, seq_idx=seq)
