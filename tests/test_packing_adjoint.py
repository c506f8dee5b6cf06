"""AdjointSharding on packed rows equals HF full backprop over every document on its own (float64): the
SSM state reset inside the scan kernels and the conv state cut at document starts, chunks cutting
documents or not."""
import pytest
import torch

import seqwrap

from .mamba_utils import grads_of, max_rel_err, tiny_mamba
from .packed_utils import spans

pytestmark = pytest.mark.ccore   # drives the scan kernels with resets: rerun under ASan/UBSan

VOCAB = 50
ALIGNED = [[8, 8, 16], [16, 8, 8]]      # chunk 8: no chunk boundary inside a document
MIXED = [[2, 1, 5, 11, 13], [3, 29]]    # 1-token and shorter-than-chunk documents, one over many chunks


def packed(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths[0])
    ids = torch.randint(0, VOCAB, (len(lengths), T), generator=g)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=g) < 0.15] = -100
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids, labels, pos


def per_document(model, ids, labels, lengths):
    """Every document alone through HF's own forward + backward: one row per document, right-padded
    (causal: the padding follows the document and its labels are ignored), in one backward, so that HF's
    float32 casts of A_log, D and the dt bias round their gradients once, as in the engine.
    Returns (sum of token losses / the step's label count, grads, that count)."""
    docs = spans(lengths)
    width = max(e - s for _, s, e in docs)
    rows = torch.zeros(len(docs), width, dtype=ids.dtype)
    targets = torch.full((len(docs), width), -100, dtype=labels.dtype)
    for r, (b, s, e) in enumerate(docs):
        rows[r, :e - s] = ids[b, s:e]
        targets[r, :e - s] = labels[b, s:e]
    count = int((targets[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    out = model(rows, labels=targets, num_items_in_batch=count)
    out.loss.backward()
    return out.loss.item(), grads_of(model), count


@pytest.mark.parametrize("lengths, chunk", [(ALIGNED, 8), (ALIGNED, 5), (MIXED, 6), (MIXED, 32)],
                         ids=["aligned-8", "aligned-5", "mixed-6", "mixed-one-chunk"])
def test_exact_equals_each_document_alone(lengths, chunk):
    model = tiny_mamba(layers=2)
    ids, labels, pos = packed(lengths)
    loss, ref, count = per_document(model, ids, labels, lengths)
    model.zero_grad(set_to_none=True)
    out = seqwrap.AdjointSharding(model, chunk_size=chunk)(ids, labels=labels, position_ids=pos)
    assert out.num_tokens == count
    assert abs(out.loss.item() - loss) <= 1e-6 * abs(loss)   # the loss is reported in float32
    err, name = max_rel_err(grads_of(model), ref)
    assert err <= 1e-9, f"{name}: {err:.3g}"


def test_conventions_and_the_check_can_fail():
    model = tiny_mamba(layers=1)
    ids, labels, pos = packed(MIXED)
    _, ref, _ = per_document(model, ids, labels, MIXED)
    cu = torch.tensor([0] + [n for row in MIXED for n in row]).cumsum(0)
    seq = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in MIXED])
    for kw in (dict(cu_seqlens=cu), dict(seq_idx=seq.to(torch.int32)), dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)):
        model.zero_grad(set_to_none=True)
        seqwrap.AdjointSharding(model, chunk_size=7)(ids, labels=labels, **kw)
        assert max_rel_err(grads_of(model), ref)[0] <= 1e-9, kw
    model.zero_grad(set_to_none=True)
    seqwrap.AdjointSharding(model, chunk_size=7)(ids, labels=labels)   # no boundaries: documents mix
    assert max_rel_err(grads_of(model), ref)[0] > 1e-3


@pytest.mark.parametrize("truncation", [None, 40])
def test_sharded_one_layer(truncation):
    """One layer: the paper's sharded mode is exact, and a truncation window longer than every document
    changes nothing; the look-ahead tokens carry their own document resets."""
    model = tiny_mamba(layers=1)
    ids, labels, pos = packed(MIXED)
    _, ref, _ = per_document(model, ids, labels, MIXED)
    model.zero_grad(set_to_none=True)
    seqwrap.AdjointSharding(model, chunk_size=6, mode="sharded", truncation=truncation)(
        ids, labels=labels, position_ids=pos)
    err, name = max_rel_err(grads_of(model), ref)
    assert err <= 1e-9, f"{name}: {err:.3g}"


def test_bad_boundaries():
    model = tiny_mamba(layers=1)
    ids, labels, pos = packed(MIXED)
    engine = seqwrap.AdjointSharding(model, chunk_size=8)
    with pytest.raises(ValueError, match="must cover every row"):
        engine(ids, cu_seqlens=torch.tensor([0, 5, 40]))
    bad = pos.clone()
    bad[1, 10] = 0
    with pytest.raises(ValueError, match="position_ids contradict cu_seqlens"):
        engine(ids, position_ids=bad, cu_seqlens=torch.tensor([0, 2, 3, 8, 19, 32, 35, 64]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        engine(ids, attention_mask=torch.ones_like(ids))
    assert all(p.grad is None for p in model.parameters())
