"""torch.compile: every seqwrap:: custom op passes torch.library.opcheck, and compiled code that uses
the ops (fullgraph, no graph break) equals eager."""
import pytest
import torch
from torch.library import opcheck

import seqwrap
from seqwrap.ops import library  # noqa: F401  (registers the ops)

ops = torch.ops.seqwrap
BACKEND = "aot_eager"  # dynamo + AOT autograd, what fullgraph tracing needs; inductor codegen is benchmarked


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# -- opcheck ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_opcheck_kahan(gdtype):
    accs = [rand(3, 5), rand(7)]
    comps = [torch.zeros(3, 5), torch.zeros(7)]
    grads = [rand(3, 5).to(gdtype), rand(7).to(gdtype)]
    opcheck(ops.kahan_accumulate_.default, (accs, comps, grads, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_lse_merge(dtype):
    acc, acc_lse = rand(2, 3, 5, 4, dtype=dtype), rand(2, 3, 5, dtype=dtype)
    opcheck(ops.lse_merge_.default, (acc, acc_lse, rand(2, 3, 5, 4, dtype=dtype), rand(2, 3, 5, dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("compute_grad", [False, True])
def test_opcheck_cross_entropy_chunk(dtype, compute_grad):
    rows, vocab = 7, 13
    labels = torch.randint(0, vocab, (rows,))
    labels[2] = -100
    real = torch.float64 if dtype == torch.float64 else torch.float32
    args = (rand(rows, vocab, dtype=dtype), labels, torch.empty(rows, dtype=real), torch.empty(rows, dtype=real),
            None, -100, 0.1, 1e-4, 0.0, compute_grad, None, 0)
    opcheck(ops.cross_entropy_chunk_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optional", [False, True])
@pytest.mark.parametrize("length", [1, 9])
def test_opcheck_selective_scan(dtype, optional, length):
    b, d, n = 2, 3, 4
    u, dt = rand(b, d, length, dtype=dtype, grad=True), (torch.rand(b, d, length, dtype=dtype) + 0.1).requires_grad_()
    A = (-torch.rand(d, n, dtype=dtype) - 0.1).requires_grad_()
    B, C = rand(b, n, length, dtype=dtype, grad=True), rand(b, n, length, dtype=dtype, grad=True)
    D = rand(d, dtype=dtype, grad=True) if optional else None
    z = rand(b, d, length, dtype=dtype, grad=True) if optional else None
    h0 = rand(b, d, n, dtype=dtype, grad=True) if optional else None
    reset = torch.zeros(b, length, dtype=torch.int32)
    if length > 3:
        reset[1, 3] = 1  # a document starts at t = 3 in row 1
    opcheck(ops.selective_scan_fwd.default, (u, dt, A, B, C, D, z, h0, 4, 0, -1, reset if optional else None))
    y, hlast, ckpt = ops.selective_scan_fwd(u.detach(), dt.detach(), A.detach(), B.detach(), C.detach(),
                                            None if D is None else D.detach(), None if z is None else z.detach(),
                                            None if h0 is None else h0.detach(), 4, 0, -1, None)
    real = y.dtype
    opcheck(ops.selective_scan_bwd.default, (u.detach(), dt.detach(), A.detach(), B.detach(), C.detach(),
                                             None if D is None else D.detach(), None if z is None else z.detach(),
                                             ckpt, torch.randn(b, d, length, dtype=real),
                                             torch.randn(b, d, n, dtype=real) if optional else None, 4, 0, length,
                                             reset if optional else None))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_linear_cross_entropy(reduction, dtype, bias):
    n, h, v = 11, 8, 17
    hidden, weight = rand(n, h, dtype=dtype, grad=True), rand(v, h, dtype=dtype, grad=True)
    b = rand(v, dtype=dtype, grad=True) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[3] = -100
    opcheck(ops.linear_cross_entropy.default, (hidden, weight, b, labels, -100, reduction, 0.1, 1e-3, 5.0, 4,
                                               True, True, bias))
    real = torch.float64 if dtype == torch.float64 else torch.float32
    opcheck(ops.linear_cross_entropy_backward.default,
            (hidden.detach(), weight.detach(), None if b is None else b.detach(), labels, torch.randn(n, dtype=real),
             -100, 0.0, 0.0, None, 4, True, True, bias))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_chunked_attention(window, dtype, packed):
    q, k, v = rand(2, 4, 7, 8, dtype=dtype, grad=True), rand(2, 2, 7, 8, dtype=dtype, grad=True), \
        rand(2, 2, 7, 8, dtype=dtype, grad=True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2, 2]]) if packed else None
    opcheck(ops.chunked_attention.default, (q, k, v, 3, True, window, 0.3, doc_ids))
    out, lse = ops.chunked_attention(q.detach(), k.detach(), v.detach(), 3, True, window, 0.3, doc_ids)
    opcheck(ops.chunked_attention_backward.default,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 3, True, window, 0.3, doc_ids))


def test_opcheck_document_ids():
    cu = torch.tensor([0, 3, 7, 9, 14])
    opcheck(ops.document_ids.default, (2, 7, torch.device("cpu"), None, cu, None, "test"))
    ids = ops.document_ids(2, 7, torch.device("cpu"), None, cu, None, "test")
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]


# -- fullgraph compile == eager ----------------------------------------------------------------------------
def _compare(fn, inputs, tol=1e-5):
    """fn(*inputs) -> a scalar; compiled (fullgraph) and eager: equal value and input gradients."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    want = fn(*leaves)
    want.backward()
    ref = [None if t.grad is None else t.grad.clone() for t in leaves]
    leaves2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    got = torch.compile(fn, fullgraph=True, backend=BACKEND)(*leaves2)
    got.backward()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(leaves2, ref):
        if b is not None:
            torch.testing.assert_close(a.grad, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("options", [
    dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none", z_loss=1e-3),
    dict(reduction="mean", softcap=4.0, chunk_size=5), dict(reduction="mean", ignore_index=-1),
])
def test_compiled_linear_cross_entropy(options):
    torch.manual_seed(0)
    hidden, weight, bias = rand(3, 7, 16, grad=True), rand(29, 16, grad=True), rand(29, grad=True)
    labels = torch.randint(0, 29, (3, 7))
    labels[0, :2] = options.get("ignore_index", -100)

    def fn(h, w, b):
        loss = seqwrap.linear_cross_entropy(h, w, labels, b, **options)
        return loss.sum() if loss.dim() else loss
    _compare(fn, [hidden, weight, bias])


def test_compiled_chunked_attention():
    torch.manual_seed(0)
    q, k, v = rand(1, 4, 13, 8, grad=True), rand(1, 2, 13, 8, grad=True), rand(1, 2, 13, 8, grad=True)
    g = torch.randn(1, 4, 13, 8)
    _compare(lambda q, k, v: (seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, window=6) * g).sum(), [q, k, v])


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "seq_idx", "position_ids"])
def test_compiled_chunked_attention_packed(boundaries):
    """Packed rows (documents of 3, 6, 4 and 8, 5 tokens) compile whole: the boundaries are resolved, with every
    check, inside the seqwrap::document_ids op, and the doc_ids values are checked inside the attention op."""
    torch.manual_seed(0)
    q, k, v = rand(2, 4, 13, 8, grad=True), rand(2, 2, 13, 8, grad=True), rand(2, 2, 13, 8, grad=True)
    g = torch.randn(2, 4, 13, 8)
    lengths = [[3, 6, 4], [8, 5]]
    seq_idx = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    given = {"cu_seqlens": torch.tensor([0, 3, 9, 13, 21, 26]), "seq_idx": seq_idx,
             "position_ids": torch.tensor([[t for n in row for t in range(n)] for row in lengths])}[boundaries]
    kw = {boundaries: given}
    _compare(lambda q, k, v: (seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, window=6, **kw) * g).sum(),
             [q, k, v])
    # the packed result, not the unpacked one: the boundaries reached the op
    unpacked = seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, window=6)
    assert not torch.allclose(seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, window=6, **kw), unpacked)


def test_compiled_chunked_attention_packed_dynamic_shapes():
    """dynamic=True: one graph for two lengths, the cu_seqlens read inside the op, equal to eager."""
    def fn(q, k, v, cu):
        return seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, cu_seqlens=cu)
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND, dynamic=True)
    for t in (13, 17):
        q, k, v = rand(2, 4, t, 8), rand(2, 2, t, 8), rand(2, 2, t, 8)
        cu = torch.tensor([0, 3, t, t + 5, 2 * t])
        torch.testing.assert_close(compiled(q, k, v, cu), fn(q, k, v, cu), rtol=1e-6, atol=1e-6)


def test_compiled_chunked_attention_refuses_bad_boundaries():
    q, k, v = rand(2, 4, 13, 8), rand(2, 2, 13, 8), rand(2, 2, 13, 8)
    fn = torch.compile(lambda q, cu: seqwrap.ops.chunked_attention(q, k, v, chunk_size=4, cu_seqlens=cu),
                       fullgraph=True, backend=BACKEND)
    with pytest.raises(ValueError, match="cu_seqlens.*crosses from row 0"):
        fn(q, torch.tensor([0, 3, 15, 26]))


def test_compiled_selective_scan():
    torch.manual_seed(0)
    b, d, n, t = 2, 3, 4, 11
    u, B, C, z = rand(b, d, t, grad=True), rand(b, n, t, grad=True), rand(b, n, t, grad=True), rand(b, d, t, grad=True)
    dt = (torch.rand(b, d, t) + 0.1).requires_grad_()
    A, D, h0 = (-torch.rand(d, n) - 0.1).requires_grad_(), rand(d, grad=True), rand(b, d, n, grad=True)

    def fn(u, dt, A, B, C, D, z, h0):
        y, h = seqwrap.ops.selective_scan(u, dt, A, B, C, D, z, h0, return_final_state=True)
        return y.square().sum() + h.sum()
    _compare(fn, [u, dt, A, B, C, D, z, h0])


def _llama(seed=0, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def test_mst_step_compiles_without_graph_break_and_equals_eager():
    from seqwrap.hf import versions

    if versions.parse_version(versions.installed("transformers") or "0") < (5, 23):
        pytest.skip("transformers < 5.23 breaks the graph inside its own Llama forward (seen on 5.15.1); "
                    "the zero-break guarantee is checked on the locked and newer releases")
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    eager, compiled = _llama(), _llama()
    for m in (eager, compiled):
        seqwrap.apply_minisequence(m, mlp_chunks=2)

    def step(model):
        return lambda ids: model(input_ids=ids, labels=ids).loss
    explain = torch._dynamo.explain(step(compiled))(ids)
    assert explain.graph_break_count == 0, [str(b.reason)[:200] for b in explain.break_reasons]
    want = step(eager)(ids)
    want.backward()
    got = torch.compile(step(compiled), fullgraph=True, backend=BACKEND)(ids)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_seco_with_a_compiled_decoder_equals_eager():
    """SeCO's chunk loop is Python that cannot be traced whole (the store, the relay, offload); the
    per-chunk model call compiles, with one break around the attention that reads the store."""
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(2))
    eager, compiled = _llama(dtype=torch.float64), _llama(dtype=torch.float64)
    compiled.model.compile(backend=BACKEND)
    want = seqwrap.SeCO(eager, chunk_size=8)(ids)
    got = seqwrap.SeCO(compiled, chunk_size=8)(ids)
    assert abs(got.loss.item() - want.loss.item()) < 1e-10
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-10 * q.grad.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optional", [False, True])
def test_opcheck_ssd_scan(dtype, optional):
    b, t, h, p, g, n = 2, 7, 4, 3, 2, 5
    x, B, C = rand(b, t, h, p, dtype=dtype, grad=True), rand(b, t, g, n, dtype=dtype, grad=True), \
        rand(b, t, g, n, dtype=dtype, grad=True)
    dt = (torch.rand(b, t, h, dtype=dtype) + 0.1).requires_grad_()
    A = (-torch.rand(h, dtype=dtype) - 0.1).requires_grad_()
    D = rand(h, dtype=dtype, grad=True) if optional else None
    z = rand(b, t, h, p, dtype=dtype, grad=True) if optional else None
    h0 = rand(b, h, p, n, dtype=dtype, grad=True) if optional else None
    opcheck(ops.ssd_scan_fwd.default, (x, dt, A, B, C, D, z, h0, 4))

    def fn(x, dt, A, B, C):
        y, hl = seqwrap.ops.ssd_scan(x, dt, A, B, C, D, z, h0, return_final_state=True)
        return y.square().sum() + hl.sum()
    _compare(fn, [x, dt, A, B, C], tol=1e-5)
