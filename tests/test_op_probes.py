"""The registered high-level ops (torch.ops.seqwrap.linear_cross_entropy, torch.ops.seqwrap.chunked_attention and
their backward ops) refuse what the public wrappers refuse, with an error naming the argument, instead of
returning unwritten memory or a silently wrong result. Each probe found on main has a test here; a compiled
graph reaches the ops directly, so the checks also hold under torch.compile(fullgraph=True)."""
import pytest
import torch

import seqwrap
from seqwrap.ops import chunked_attention
from seqwrap.ops.documents import Documents

ops = torch.ops.seqwrap
# a refusal while tracing (from the fake implementation) reaches the caller wrapped by dynamo, message included
TRACED_ERRORS = (ValueError, torch._dynamo.exc.TorchRuntimeError)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- linear cross-entropy ----------------------------------------------------------------------------------
N, H, V = 9, 8, 13


def ce_inputs(seed=0, dtype=torch.float64):
    g = gen(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, labels


def ce_args(**change):
    hidden, weight, bias, labels = ce_inputs()
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_rows=4, need_hidden=False, need_weight=False,
                need_bias=False)
    args.update(change)
    return list(args.values())


def test_ce_op_valid_call_matches_wrapper():
    hidden, weight, bias, labels = ce_inputs(1)
    got = ops.linear_cross_entropy(*ce_args(hidden=hidden, weight=weight, bias=bias, labels=labels))[0]
    want = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, chunk_size=4)
    assert torch.equal(got, want)


CE_BAD = [
    (dict(chunk_rows=-1), ValueError, "chunk_rows"),              # probe: losses of 1e11-1e35 on main
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(reduction="avg"), ValueError, "reduction"),             # probe: acted as "none" on main
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss=float("inf")), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-2.0), ValueError, "softcap"),
    (dict(hidden=torch.randn(3, 3, H, dtype=torch.float64)), ValueError, "hidden"),
    (dict(hidden=torch.randn(0, H, dtype=torch.float64), labels=torch.zeros(0, dtype=torch.int64)), ValueError,
     "no tokens"),
    (dict(labels=torch.zeros(N, dtype=torch.int32)), TypeError, "labels"),
    (dict(labels=torch.zeros(N - 1, dtype=torch.int64)), ValueError, "labels"),
    (dict(labels=torch.zeros(N, dtype=torch.float64)), TypeError, "labels"),
    (dict(weight=torch.randn(V, H + 1, dtype=torch.float64)), ValueError, "weight"),
    (dict(weight=torch.randn(V, H)), TypeError, "weight"),
    (dict(bias=torch.randn(V + 1, dtype=torch.float64)), ValueError, "bias"),
    (dict(hidden=torch.randint(0, 3, (N, H)), weight=torch.randint(0, 3, (V, H)), bias=None), TypeError, "hidden"),
    (dict(weight=torch.randn(0, H, dtype=torch.float64), bias=None), ValueError, "weight"),
]


@pytest.mark.parametrize("change, exc, pattern", CE_BAD, ids=[str(i) for i in range(len(CE_BAD))])
def test_ce_op_refuses_what_the_wrapper_refuses(change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.linear_cross_entropy(*ce_args(**change))


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(chunk_rows=-1), ValueError, "chunk_rows"),
    (dict(label_smoothing=-0.5), ValueError, "label_smoothing"),
    (dict(row_scale=torch.ones(N - 2, dtype=torch.float64)), ValueError, "row_scale"),
    (dict(row_scale=torch.ones(N)), TypeError, "row_scale"),
])
def test_ce_backward_op_refuses_bad_arguments(change, exc, pattern):
    hidden, weight, bias, labels = ce_inputs()
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, row_scale=torch.ones(N, dtype=torch.float64),
                ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_rows=4, need_hidden=True,
                need_weight=True, need_bias=True)
    args.update(change)
    with pytest.raises(exc, match=pattern):
        ops.linear_cross_entropy_backward(*args.values())


def test_ce_op_refuses_under_compile():
    """A compiled graph that calls the op directly gets the same refusal (from the fake implementation while
    tracing)."""
    hidden, weight, bias, labels = ce_inputs()
    fn = torch.compile(lambda h: ops.linear_cross_entropy(h, weight, bias, labels, -100, "avg", 0.0, 0.0, None, 4,
                                                          False, False, False)[0], fullgraph=True, backend="aot_eager")
    with pytest.raises(TRACED_ERRORS, match="reduction must be one of"):
        fn(hidden)


# -- chunked attention -------------------------------------------------------------------------------------
B, HQ, HK, T, D = 2, 4, 2, 11, 8


def attn_inputs(seed=0, dtype=torch.float64, t=T):
    g = gen(seed)
    q = torch.randn(B, HQ, t, D, generator=g, dtype=dtype)
    k = torch.randn(B, HK, t, D, generator=g, dtype=dtype)
    v = torch.randn(B, HK, t, D, generator=g, dtype=dtype)
    return q, k, v


def attn_args(**change):
    q, k, v = attn_inputs()
    args = dict(q=q, k=k, v=v, chunk=4, causal=True, window=None, scale=0.3, doc_ids=None)
    args.update(change)
    return list(args.values())


def docs_of(lengths):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


DOCS = docs_of([[3, 5, 3], [6, 5]])


def test_attention_op_valid_call_matches_wrapper():
    q, k, v = attn_inputs(2)
    cu = torch.tensor([0, 3, 8, 11, 17, 22])
    got = ops.chunked_attention(q, k, v, 4, True, 5, 0.3, DOCS)[0]
    want = chunked_attention(q, k, v, chunk_size=4, window=5, scale=0.3, cu_seqlens=cu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


ATTN_BAD = [
    (dict(chunk=-1), ValueError, "chunk"),                     # probe: unwritten output on main
    (dict(chunk=0), ValueError, "chunk"),
    (dict(window=0), ValueError, "window"),                    # probe: zeros on main
    (dict(window=-3), ValueError, "window"),
    (dict(causal=False, window=3), ValueError, "window"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    # probe: the document check compared only the first and last id: off by 0.5, no error
    (dict(doc_ids=torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]] * 2)), ValueError, "doc_ids.*non-decreasing"),
    (dict(doc_ids=DOCS[:1]), ValueError, "doc_ids"),           # probe: broadcast over batch 2 on main
    (dict(doc_ids=DOCS[:, :7]), ValueError, "doc_ids"),        # probe: a bare IndexError on main
    (dict(doc_ids=DOCS[0]), ValueError, "doc_ids"),
    (dict(doc_ids=DOCS.double()), TypeError, "doc_ids"),
    (dict(doc_ids=DOCS.bool()), TypeError, "doc_ids"),
    (dict(q=torch.randn(B, HQ, T, D)), ValueError, "share dtype"),
    (dict(q=torch.randn(B, 3, T, D, dtype=torch.float64)), ValueError, "multiple"),
    (dict(v=torch.randn(B, HK, T - 1, D, dtype=torch.float64)), ValueError, "shapes"),
    (dict(q=torch.randn(B, HQ, T, dtype=torch.float64)), ValueError, "'q'"),
    (dict(q=torch.randint(0, 3, (B, HQ, T, D))), TypeError, "'q'"),
]


@pytest.mark.parametrize("change, exc, pattern", ATTN_BAD, ids=[str(i) for i in range(len(ATTN_BAD))])
def test_attention_op_refuses_what_the_wrapper_refuses(change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.chunked_attention(*attn_args(**change))


@pytest.mark.parametrize("change, exc, pattern", [
    (dict(chunk=-1), ValueError, "chunk"), (dict(window=0), ValueError, "window"),
    (dict(doc_ids=DOCS[:1]), ValueError, "doc_ids"),
    (dict(doc_ids=torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]] * 2)), ValueError, "non-decreasing"),
    (dict(lse=torch.zeros(B, HQ, T - 1, dtype=torch.float64)), ValueError, "lse"),
    (dict(dout=torch.zeros(B, HQ, T, D + 1, dtype=torch.float64)), ValueError, "dout"),
])
def test_attention_backward_op_refuses_bad_arguments(change, exc, pattern):
    q, k, v = attn_inputs()
    out, lse = ops.chunked_attention(q, k, v, 4, True, None, 0.3, None)
    args = dict(dout=torch.ones_like(out), q=q, k=k, v=v, out=out, lse=lse, chunk=4, causal=True, window=None,
                scale=0.3, doc_ids=None)
    args.update(change)
    with pytest.raises(exc, match=pattern):
        ops.chunked_attention_backward(*args.values())


def test_wrapper_refuses_what_the_op_refuses():
    q, k, v = attn_inputs()
    with pytest.raises(ValueError, match="scale"):
        chunked_attention(q, k, v, chunk_size=4, scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        chunked_attention(q, k, v, chunk_size=4, causal="yes")
    with pytest.raises(ValueError, match="position_ids"):
        chunked_attention(q, k, v, chunk_size=4, position_ids=torch.arange(T - 2)[None].expand(B, -1))
    with pytest.raises(TypeError, match="documents"):
        chunked_attention(q, k, v, chunk_size=4, documents=DOCS)
    with pytest.raises(TypeError, match="not both"):   # documents would have won silently on main
        chunked_attention(q, k, v, chunk_size=4, documents=Documents(DOCS), seq_idx=DOCS)


def test_wrapper_broadcasts_one_row_of_position_ids():
    """position_ids (1, T) for a batch of B (as HF builds them) describe every row: the op gets (B, T) doc_ids."""
    q, k, v = attn_inputs(3)
    pos = torch.cat([torch.arange(4), torch.arange(7)])[None]
    got = chunked_attention(q, k, v, chunk_size=4, position_ids=pos)
    want = chunked_attention(q, k, v, chunk_size=4, position_ids=pos.expand(B, -1))
    assert torch.equal(got, want)


def test_non_monotone_doc_ids_refused_under_compile():
    """The value check (non-decreasing doc_ids) runs inside the op, opaque to the compiler: a fullgraph
    compile traces, and the call with bad values raises."""
    q, k, v = attn_inputs()
    fn = torch.compile(lambda q, ids: ops.chunked_attention(q, k, v, 4, True, None, 0.3, ids)[0], fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, DOCS), ops.chunked_attention(q, k, v, 4, True, None, 0.3, DOCS)[0])
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(q, torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]] * 2))


def test_bad_window_refused_under_compile():
    q, k, v = attn_inputs()
    fn = torch.compile(lambda q: ops.chunked_attention(q, k, v, 4, True, 0, 0.3, None)[0], fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(TRACED_ERRORS, match="window must be a positive int"):
        fn(q)


def test_document_ids_op_refuses_bad_arguments():
    cu = torch.tensor([0, 3, 11, 22])
    assert ops.document_ids(2, 11, torch.device("cpu"), None, cu, None, "t").tolist() == [[0] * 3 + [1] * 8, [0] * 11]
    with pytest.raises(ValueError, match="position_ids"):
        ops.document_ids(2, 11, torch.device("cpu"), torch.arange(11)[None], None, None, "t")
    with pytest.raises(ValueError, match="cu_seqlens.*ends at 22"):
        ops.document_ids(2, 12, torch.device("cpu"), None, cu, None, "t")
    with pytest.raises(ValueError, match="seq_idx"):
        ops.document_ids(2, 11, torch.device("cpu"), None, None, torch.zeros(2, 10, dtype=torch.int64), "t")
    with pytest.raises(ValueError, match="negative"):
        ops.document_ids(-1, 11, torch.device("cpu"), None, None, None, "t")
