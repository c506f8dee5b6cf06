"""Every C op refuses a written tensor that shares memory with another argument (views with
offsets into one storage included), and bumps the autograd version of what it writes, so that
autograd's "modified by an inplace operation" check sees the write (issue 16, items 6 and 7)."""
import pytest
import torch

import seqwrap

from .isolated import run_isolated
from .scan_reference import random_inputs

pytestmark = pytest.mark.ccore
C = seqwrap._C
OVERLAP = "overlap in memory"


def expect_overlap(call, names, *watched):
    """call() must raise the overlap ValueError naming both arguments and leave `watched` unchanged."""
    before = [w.clone() for w in watched]
    with pytest.raises(ValueError, match=OVERLAP) as info:
        call()
    for n in names:
        assert f"'{n}'" in str(info.value), str(info.value)
    for b, w in zip(before, watched):
        assert torch.equal(b, w), "a refused call must not write"


# ---- Kahan -------------------------------------------------------------------------------------

def test_kahan_accumulator_overlapping_the_gradient(bridge):
    buf = torch.arange(6, dtype=torch.float32)
    expect_overlap(lambda: seqwrap.kahan_accumulate_([buf[1:]], [torch.zeros(5)], [buf[:-1]]),
                   ("accs[0]", "grads[0]"), buf)
    g = torch.ones(4)
    expect_overlap(lambda: seqwrap.kahan_accumulate_([g], [torch.zeros(4)], [g]), ("accs[0]", "grads[0]"), g)
    # a compensation buffer over another list entry's gradient
    a, gs = [torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.ones(3)]
    expect_overlap(lambda: seqwrap.kahan_accumulate_(a, [torch.zeros(3), gs[0]], gs), ("comps[1]", "grads[0]"),
                   gs[0])


def test_kahan_disjoint_views_and_shared_gradients_are_fine(bridge):
    buf = torch.zeros(10)
    g = torch.ones(5)
    seqwrap.kahan_accumulate_([buf[:5]], [buf[5:]], [g])  # adjacent, disjoint views of one storage
    torch.testing.assert_close(buf[:5], torch.ones(5))
    accs = [torch.zeros(5), torch.zeros(5)]
    seqwrap.kahan_accumulate_(accs, [torch.zeros(5), torch.zeros(5)], [g, g], 2.0)  # read twice: fine
    torch.testing.assert_close(accs[1], torch.full((5,), 2.0))


# ---- cross-entropy -----------------------------------------------------------------------------

def xent_args(rows=4, V=7):
    return dict(logits=torch.randn(rows, V), labels=torch.randint(0, V, (rows,)), loss=torch.empty(rows),
                lse=torch.empty(rows), grad_scale=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=0.0, compute_grad=True, error_flag=None, stream=0)


def test_cross_entropy_chunk_overlaps():
    # In a child interpreter: before the fix, a loss written over the labels made a label point
    # far outside its row (segfault).
    out = run_isolated("""
import torch
def xent_args(rows=4, V=7):
    return dict(logits=torch.randn(rows, V), labels=torch.randint(0, V, (rows,)), loss=torch.empty(rows),
                lse=torch.empty(rows), grad_scale=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=0.0, compute_grad=True, error_flag=None, stream=0)
cases = {
    ("loss", "lse"): lambda a: a.update(lse=a["loss"]),
    ("logits", "loss"): lambda a: a.update(loss=a["logits"].view(-1)[3:7]),
    ("logits", "lse"): lambda a: a.update(lse=a["logits"].view(-1)[-4:]),
    ("labels", "loss"): lambda a: a.update(loss=a["labels"].view(torch.float32)[2:6]),
    ("logits", "grad_scale"): lambda a: a.update(grad_scale=a["logits"].view(-1)[10:14]),
    ("logits", "labels"): lambda a: a.update(labels=a["logits"].view(-1)[:8].view(torch.int64).zero_()),
}
for mode, ((first, second), change) in [(m, c) for m in ("auto", "capsule") for c in cases.items()]:
    print("case", mode, first, second, flush=True)
    seqwrap._C._set_bridge_mode(mode)
    a = xent_args()
    change(a)
    logits, labels = a["logits"].clone(), a["labels"].clone()
    try:
        seqwrap._C.cross_entropy_chunk(**a)
    except ValueError as e:
        assert f"arguments '{first}' and '{second}' overlap in memory" in str(e), e
        assert torch.equal(a["logits"], logits) and torch.equal(a["labels"], labels), "written before refusing"
        print("refused", first, second)
    else:
        print("accepted", first, second)
""")
    assert out.count("refused") == 12, out


# ---- LSE merge ---------------------------------------------------------------------------------

def test_lse_merge_accumulator_aliasing_a_block(bridge):
    acc, acc_lse = torch.randn(2, 3, 4), torch.randn(2, 3)
    expect_overlap(lambda: C.lse_merge(acc, acc_lse, acc, torch.randn(2, 3), None), ("acc_out", "blk_out"), acc)
    expect_overlap(lambda: C.lse_merge(acc, acc_lse, torch.randn(2, 3, 4), acc_lse, None), ("acc_lse", "blk_lse"),
                   acc_lse)
    buf = torch.randn(2 * 3 * 4 + 6)  # acc_lse inside acc_out's storage, at an offset
    expect_overlap(lambda: C.lse_merge(buf[:24].view(2, 3, 4), buf[20:26].view(2, 3), torch.randn(2, 3, 4),
                                       torch.randn(2, 3), None), ("acc_out", "acc_lse"), buf)


# ---- selective scan ----------------------------------------------------------------------------

def scan_inputs():
    return random_inputs(batch=2, dim=3, dstate=4, length=5, dtype=torch.float32, requires_grad=False)


def test_scan_forward_output_aliasing_an_input(bridge):
    u, dt, A, B, Cm, D, z, h0 = scan_inputs()
    hlast, ckpt = torch.empty(2, 3, 4), torch.empty(2, 3, 1, 4)
    expect_overlap(lambda: C.selective_scan_fwd(u, dt, A, B, Cm, D, z, h0, u, hlast, ckpt, 64, None, 0),
                   ("y", "u"), u)
    expect_overlap(lambda: C.selective_scan_fwd(u, dt, A, B, Cm, D, z, h0, torch.empty(2, 3, 5), h0, ckpt, 64,
                                                None, 0), ("hlast", "h0"), h0)


def scan_backward_args():
    u, dt, A, B, Cm, D, z, h0 = scan_inputs()
    y, hlast, ckpt = torch.empty(2, 3, 5), torch.empty(2, 3, 4), torch.empty(2, 3, 1, 4)
    C.selective_scan_fwd(u, dt, A, B, Cm, D, z, h0, y, hlast, ckpt, 64, None, 0)
    e = lambda *s: torch.empty(*s)  # noqa: E731
    return dict(u=u, dt=dt, A=A, B=B, C=Cm, D=D, z=z, ckpt=ckpt, dy=torch.randn(2, 3, 5), dhlast=None,
                du=e(2, 3, 5), ddt=e(2, 3, 5), dz=e(2, 3, 5), dB=torch.zeros(2, 4, 5), dC=torch.zeros(2, 4, 5),
                dA=e(2, 3, 4), dD=e(2, 3), dh0=e(2, 3, 4), block=64, trunc=0, grad_len=5, work=None, stream=0)


@pytest.mark.parametrize("out, other", [("du", "dt"), ("ddt", "du"), ("dz", "dy"), ("dB", "dC"), ("dA", "dh0")])
def test_scan_backward_gradient_aliasing_another_argument(bridge, out, other):
    a = scan_backward_args()
    a[out] = a[other]
    watched = a[other].clone()
    with pytest.raises(ValueError, match=OVERLAP):
        C.selective_scan_bwd(**a)
    if other not in ("du", "dC", "dh0"):  # read-only arguments keep their values
        assert torch.equal(a[other], watched)


def test_scan_backward_gradients_in_one_buffer_at_offsets(bridge):
    a = scan_backward_args()
    buf = torch.empty(2 * 3 * 5 * 2 - 1)
    a["du"], a["ddt"] = buf[:30].view(2, 3, 5), buf[29:].view(2, 3, 5)
    with pytest.raises(ValueError, match=r"'du' and 'ddt' overlap in memory|'ddt' and 'du' overlap in memory"):
        C.selective_scan_bwd(**a)


# ---- sampler and half rounding -----------------------------------------------------------------

def test_sample_chunks_weights_overlapping_probs(bridge):
    buf = torch.full((5,), 0.5, dtype=torch.float64)
    expect_overlap(lambda: C.sample_chunks(buf[:4], buf[1:], 1, 2, "bernoulli", 0, 0.0, 0), ("weights", "probs"),
                   buf)
    expect_overlap(lambda: C.sample_chunks(buf, buf, 1, 2, "bernoulli", 0, 0.0, 0), ("weights", "probs"), buf)


def test_round_to_half_destination_over_the_source(bridge):
    src = torch.randn(8)
    expect_overlap(lambda: C._round_to_half(src, src.view(torch.bfloat16)[:8]), ("dst", "src"), src)


# ---- version counters --------------------------------------------------------------------------

def test_kahan_write_is_seen_by_autograd(bridge):
    x = torch.ones(3, requires_grad=True)
    acc = torch.ones(3)
    y = (x * acc).sum()  # saves acc for backward
    seqwrap.kahan_accumulate_([acc], [torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()

    # the same with torch's own in-place add, for reference
    x2, acc2 = torch.ones(3, requires_grad=True), torch.ones(3)
    y2 = (x2 * acc2).sum()
    acc2.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.backward()


def test_kahan_accumulator_add_bumps_versions(bridge):
    acc = seqwrap.KahanAccumulator([torch.zeros(4)])
    v = acc.values()[0]
    x = torch.ones(4, requires_grad=True)
    y = (x * v).sum()
    acc.add_([torch.ones(4)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def versions(*ts):
    return [t._version for t in ts]


def test_every_op_bumps_what_it_writes_and_only_that(bridge):
    acc, comp, g = torch.zeros(3), torch.zeros(3), torch.ones(3)
    before = versions(acc, comp, g)
    C.kahan_accumulate([acc], [comp], [g], 1.0, None)
    after = versions(acc, comp, g)
    assert after[0] > before[0] and after[1] > before[1] and after[2] == before[2]

    a = xent_args()
    watched = (a["logits"], a["loss"], a["lse"], a["labels"])
    before = versions(*watched)
    C.cross_entropy_chunk(**a)
    after = versions(*watched)
    assert all(x > y for x, y in zip(after[:3], before[:3])) and after[3] == before[3]

    acc_out, acc_lse, blk_out, blk_lse = torch.randn(2, 4), torch.randn(2), torch.randn(2, 4), torch.randn(2)
    before = versions(acc_out, acc_lse, blk_out, blk_lse)
    C.lse_merge(acc_out, acc_lse, blk_out, blk_lse, None)
    after = versions(acc_out, acc_lse, blk_out, blk_lse)
    assert after[0] > before[0] and after[1] > before[1] and after[2:] == before[2:]

    w, p = torch.empty(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    before = versions(w, p)
    C.sample_chunks(w, p, 0, 0, "bernoulli", 0, 0.0, None)
    after = versions(w, p)
    assert after[0] > before[0] and after[1] == before[1]

    a = scan_backward_args()
    outs = [a[k] for k in ("du", "ddt", "dz", "dB", "dC", "dA", "dD", "dh0")]
    ins = [a[k] for k in ("u", "dt", "B", "C", "z", "dy", "ckpt")]
    before_o, before_i = versions(*outs), versions(*ins)
    C.selective_scan_bwd(**a)
    assert all(x > y for x, y in zip(versions(*outs), before_o)) and versions(*ins) == before_i


def test_inference_tensors_are_written_without_a_version(bridge):
    with torch.inference_mode():
        acc, comp, g = torch.zeros(3), torch.zeros(3), torch.ones(3)
    seqwrap.kahan_accumulate_([acc], [comp], [g])
    torch.testing.assert_close(acc, torch.ones(3))
