"""seqwrap.ops.reference (cross-entropy, attention, LSE merge, Kahan, sampler) against independent computations
(torch's F.cross_entropy and scaled_dot_product_attention, math.fsum, the empirical mean of many draws), and
the ops against the reference, in float64 on fresh random inputs. The scans: tests/test_reference_scans.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import seqwrap
from seqwrap.ops import chunked_attention, library, reference
from seqwrap.ops.attention_blocks import EMPTY, BlockBackward, attend, block_mask

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- linear cross-entropy ----------------------------------------------------------------------------------
def ce_case(seed, n=37, h=16, v=23):
    g = gen(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -7
    return hidden, weight, bias, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_ce_reference_equals_torch_cross_entropy(reduction, smoothing, softcap):
    hidden, weight, bias, labels = ce_case(1)
    got, lse = reference.linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index=-7, reduction=reduction,
                                                  label_smoothing=smoothing, softcap=softcap)
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits, labels, ignore_index=-7, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-13, atol=1e-13)


def test_ce_reference_z_loss_and_all_ignored():
    hidden, weight, bias, labels = ce_case(2)
    keep = labels != -7
    base, lse = reference.linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index=-7, reduction="none")
    with_z, _ = reference.linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index=-7, reduction="none",
                                                   z_loss=1e-2)
    torch.testing.assert_close(with_z - base, 1e-2 * lse**2 * keep, rtol=1e-12, atol=1e-14)
    assert float((with_z - base).detach()[keep].min()) > 0          # the z-loss term is really there
    none = torch.full_like(labels, -7)
    loss, _ = reference.linear_cross_entropy_ref(hidden, weight, none, bias, ignore_index=-7)
    assert loss.item() == 0.0                               # (F.cross_entropy gives nan here)
    with pytest.raises(ValueError, match="reduction"):
        reference.linear_cross_entropy_ref(hidden, weight, labels, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_op_matches_reference(reduction):
    hidden, weight, bias, labels = ce_case(3)
    opts = dict(ignore_index=-7, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    loss = seqwrap.linear_cross_entropy(hidden, weight, labels, bias, chunk_size=8, **opts)
    ref, _ = reference.linear_cross_entropy_ref(hidden, weight, labels, bias, **opts)
    up = torch.randn(ref.shape, generator=gen(4), dtype=F64)
    got = torch.autograd.grad((loss * up).sum(), (hidden, weight, bias))
    want = torch.autograd.grad((ref * up).sum(), (hidden, weight, bias))
    assert rel(loss, ref) <= 1e-12
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert rel(a, b) <= 1e-12, name


def test_ce_reference_takes_any_dtype_and_computes_in_float64():
    hidden, weight, bias, labels = ce_case(5)
    loss, lse = reference.linear_cross_entropy_ref(hidden.float(), weight.bfloat16(), labels, bias.half(),
                                                   ignore_index=-7)
    assert loss.dtype == F64 and lse.dtype == F64
    want, _ = reference.linear_cross_entropy_ref(hidden.float().double(), weight.bfloat16().double(), labels,
                                                 bias.half().double(), ignore_index=-7)
    assert loss.item() == want.item()


# -- attention ---------------------------------------------------------------------------------------------
def attn_case(seed, b=2, hq=4, hk=2, t=19, d=8, dv=None):
    g = gen(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(b, hk, t, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(b, hk, t, dv or d, generator=g, dtype=F64, requires_grad=True)
    return q, k, v


DOC_IDS = torch.tensor([[0] * 4 + [1] * 9 + [2] * 6, [0] * 12 + [3] * 7])
CU = torch.tensor([0, 4, 13, 19, 31, 38])


def sdpa(q, k, v, mask, scale=None):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask,
                                          scale=scale)


@pytest.mark.parametrize("causal, window, docs, dv", [(True, None, False, None), (False, None, False, None),
                                                      (True, 5, False, None), (True, 6, True, None),
                                                      (True, None, True, 5), (False, None, True, 12)])
def test_attention_reference_equals_sdpa(causal, window, docs, dv):
    q, k, v = attn_case(6, dv=dv)
    ids = DOC_IDS if docs else None
    out, lse = reference.attention_ref(q, k, v, causal=causal, window=window, doc_ids=ids, scale=0.4)
    i = torch.arange(q.shape[2])
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if window is not None:
        mask = mask & ((i[:, None] - i[None]) < window)
    mask = mask[None, None] & (ids[:, None, :, None] == ids[:, None, None, :]) if docs else mask
    want = sdpa(q, k, v, mask, scale=0.4)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    up = torch.randn(out.shape, generator=gen(7), dtype=F64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert lse.shape == q.shape[:3] and bool(torch.isfinite(lse).all())


def test_attention_reference_lse_equals_the_fused_cpu_kernel():
    q, k, v = attn_case(8, hq=2, hk=2)
    _, lse = reference.attention_ref(q, k, v, scale=0.3)
    _, want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.detach(), k.detach(), v.detach(), 0.0,
                                                                         True, scale=0.3)
    torch.testing.assert_close(lse, want, rtol=1e-13, atol=1e-13)


def test_attention_reference_sinks_equal_sdpa_with_a_sink_key():
    """A sink is one more key with value 0 whose logit is the sink: SDPA over a key of zeros with the sink as an
    additive mask entry. Key padding leaves row 1's first queries with no real key (output 0 under SDPA too)."""
    q, k, v = attn_case(9)
    b, hq, t, _ = q.shape
    sinks = torch.randn(hq, generator=gen(10), dtype=F64, requires_grad=True)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, :5] = False
    out, lse = reference.attention_ref(q, k, v, window=7, key_padding=pad, sinks=sinks, scale=0.5)
    allowed = reference.attention_mask_ref(t, window=7, key_padding=pad)     # checked against SDPA above
    bias = torch.zeros(b, hq, t, t, dtype=F64).masked_fill(~allowed, float("-inf"))
    bias = torch.cat([bias, sinks.view(1, hq, 1, 1).expand(b, hq, t, 1)], -1)
    zero = torch.zeros(b, k.shape[1], 1, k.shape[-1], dtype=F64)
    want = sdpa(q, torch.cat([k, zero], 2), torch.cat([v, zero], 2), bias, scale=0.5)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    assert bool((out[1, :, :5] == 0).all())
    torch.testing.assert_close(lse[1, :, :5], sinks.detach().view(hq, 1).expand(hq, 5), rtol=0, atol=0)
    up = torch.randn(out.shape, generator=gen(11), dtype=F64)
    for a, c in zip(torch.autograd.grad(out, (q, k, v, sinks), up), torch.autograd.grad(want, (q, k, v, sinks), up)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_attention_reference_softcap_equals_softmax_of_capped_scores():
    q, k, v = attn_case(12, hq=2, hk=1)
    out, _ = reference.attention_ref(q, k, v, softcap=2.0, scale=0.7)
    s = 2.0 * torch.tanh(q @ k.transpose(-1, -2) * 0.7 / 2.0)
    s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("window", [None, 4])
def test_chunked_attention_matches_reference(window):
    q, k, v = attn_case(13)
    out = chunked_attention(q, k, v, chunk_size=5, window=window, cu_seqlens=CU)
    ref, _ = reference.attention_ref(q, k, v, window=window, doc_ids=DOC_IDS)
    up = torch.randn(out.shape, generator=gen(14), dtype=F64)
    assert rel(out, ref) <= 1e-13
    for a, b in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("dv, softcap", [(8, None), (5, None), (8, 3.0)])
def test_attention_blocks_match_reference(dv, softcap):
    """The block primitives the engines use (attend + the LSE merge, BlockBackward), with sinks, key padding, a
    window and Dv != D: output, lse and every gradient against the reference."""
    q, k, v = attn_case(15, dv=dv)
    b, hq, t, _ = q.shape
    sinks = torch.randn(hq, generator=gen(16), dtype=F64, requires_grad=True)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[0, -3:] = False
    window, chunk, scale = 9, 6, 0.45
    ref, ref_lse = reference.attention_ref(q, k, v, window=window, key_padding=pad, sinks=sinks, scale=scale,
                                           softcap=softcap)
    up = torch.randn(ref.shape, generator=gen(17), dtype=F64)
    want = torch.autograd.grad(ref, (q, k, v, sinks), up)
    blocks = [(s, min(t, s + chunk)) for s in range(0, t, chunk)]
    outs, lses, dq = [], [], []
    dk, dv_, ds = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(sinks)
    with torch.no_grad():
        for q0, q1 in blocks:
            kv = [(k0, k1, m) for k0, k1 in blocks
                  if (m := block_mask(q0, q1, k0, k1, window=window, key_padding=pad, dtype=F64)) is not EMPTY]
            out, lse = attend(q[:, :, q0:q1], [(k[:, :, a:e], v[:, :, a:e], m) for a, e, m in kv], scale, softcap,
                              sinks, dv)
            back = BlockBackward(up[:, :, q0:q1], q[:, :, q0:q1], out, lse, k.shape[1], scale, softcap, sinks)
            for a, e, m in kv:
                gk, gv = back.block(k[:, :, a:e], v[:, :, a:e], m)
                dk[:, :, a:e] += gk
                dv_[:, :, a:e] += gv
            outs.append(out), lses.append(lse), dq.append(back.dq())
            ds += back.sinks_grad()
    assert rel(torch.cat(outs, 2), ref) <= 1e-12 and rel(torch.cat(lses, 2), ref_lse) <= 1e-13
    for name, a, r in zip("q k v sinks".split(), (torch.cat(dq, 2), dk, dv_, ds), want):
        assert rel(a, r) <= 1e-12, name


# -- LSE merge ---------------------------------------------------------------------------------------------
def test_lse_merge_reference_equals_attention_over_all_keys():
    """Attention over keys [0, 5) merged with attention over keys [5, 12) is attention over all keys."""
    q, k, v = attn_case(18, b=1, hq=2, hk=2, t=12)
    first = (torch.arange(12) < 5)[None]
    whole, whole_lse = reference.attention_ref(q, k, v, causal=False)
    a, a_lse = reference.attention_ref(q, k, v, causal=False, key_padding=first)
    b, b_lse = reference.attention_ref(q, k, v, causal=False, key_padding=~first)
    assert rel(a, whole) > 1e-2 and rel(b, whole) > 1e-2
    out, lse = reference.lse_merge_ref(a, a_lse, b, b_lse)
    torch.testing.assert_close(out, whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("block_dtype", [F64, torch.float32])
def test_lse_merge_kernel_matches_reference(block_dtype):
    g = gen(19)
    real = F64 if block_dtype == F64 else torch.float32
    acc = torch.randn(2, 3, 7, 4, generator=g, dtype=F64).to(real)
    acc_lse = torch.randn(2, 3, 7, generator=g, dtype=F64).to(real)
    blk = torch.randn(2, 3, 7, 4, generator=g, dtype=F64).to(block_dtype)
    blk_lse = torch.randn(2, 3, 7, generator=g, dtype=F64).to(real)
    acc_lse[0, 0, :2] = float("-inf")                     # empty accumulator rows
    blk_lse[1, 2, 3:5] = float("-inf")                    # empty block rows (their output ignored)
    blk[1, 2, 3] = float("nan")
    want, want_lse = reference.lse_merge_ref(acc, acc_lse, blk, blk_lse)
    library.lse_merge(acc, acc_lse, blk, blk_lse)
    tol = 1e-14 if real == F64 else 1e-6
    torch.testing.assert_close(acc.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(acc_lse.double(), want_lse, rtol=tol, atol=tol)


# -- Kahan accumulation ------------------------------------------------------------------------------------
def test_kahan_reference_is_the_exact_sum():
    g = gen(20)
    steps = [(torch.randn(50, generator=g).to(torch.bfloat16), float(torch.rand(1, generator=g)) * 3)
             for _ in range(200)]
    start = torch.randn(50, generator=g)
    acc = [start]
    for grads, scale in steps:
        acc = reference.kahan_accumulate_ref(acc, [grads], scale)
    s32 = [float(torch.tensor(s, dtype=torch.float32)) for _, s in steps]
    for i in range(50):
        exact = math.fsum([float(start[i])] + [s * float(gr[i]) for (gr, _), s in zip(steps, s32)])
        assert abs(acc[0][i].item() - exact) <= 1e-14 * (abs(exact) + 1)


def test_kahan_kernel_close_to_reference():
    g = gen(21)
    acc, comp = torch.full((300,), 1e3), torch.zeros(300)
    exact = [acc.double()]
    for _ in range(500):
        grads = [torch.randn(300, generator=g) * 1e-3]
        seqwrap.kahan_accumulate_([acc], [comp], grads, 0.3)
        exact = reference.kahan_accumulate_ref(exact, grads, 0.3)
    err = (acc.double() - exact[0]).abs().max().item()
    assert err <= 2 * torch.finfo(torch.float32).eps * 1e3   # one float32 rounding of the total, no drift


# -- chunk sampler -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling, kw", [("bernoulli", dict(probs=[0.1, 0.5, 0.9, 1.0, 0.3])),
                                          ("fixed", dict(budget=2)), ("fixed", dict(budget=2, max_compensation=1.5))])
def test_sampler_mean_weight_is_the_expectation(sampling, kw):
    """The empirical mean of the factors over many steps against sample_chunks_expectation (1 per chunk, except
    under a binding cap: 2/5 * 1.5 = 0.6), within 5 standard errors."""
    n, k = 4000, 5
    draws = torch.stack([seqwrap.sample_chunks(k, sampling=sampling, seed=9, step=s, **kw) for s in range(n)])
    want = reference.sample_chunks_expectation(k, sampling=sampling, **kw)
    if "max_compensation" in kw:
        torch.testing.assert_close(want, torch.full((k,), 0.6, dtype=F64))
    else:
        torch.testing.assert_close(want, torch.ones(k, dtype=F64))
    err = draws.std(0) / math.sqrt(n)
    assert bool(((draws.mean(0) - want).abs() <= 5 * err + 1e-12).all()), (draws.mean(0), want)
