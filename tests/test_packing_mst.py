"""MsT (apply_minisequence) on packed rows equals every document trained alone (float64), through the
model's own forward: HF's attention keeps the documents apart, the fused loss skips the target of each
document's last token."""
import pytest
import torch

import seqwrap

from .hf_tiny import max_rel_err, tiny_model
from .packed_utils import packed_batch, per_document_reference

LENGTHS = [[5, 1, 8, 10], [12, 12]]
TOL = 1e-9


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2"])
def test_equals_each_document_alone(family):
    model = tiny_model(family)
    ids, labels, pos, cu, _ = packed_batch(LENGTHS)
    loss, grads, _ = per_document_reference(model, ids, labels, LENGTHS)
    seqwrap.apply_minisequence(model, mlp_chunks=3)
    model.train()
    out = model(ids, labels=labels, position_ids=pos)
    assert out.logits is None
    out.loss.backward()
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


def test_explicit_boundaries_and_the_check_can_fail():
    model = tiny_model("llama")
    ids, labels, pos, cu, seq = packed_batch(LENGTHS)
    loss, grads, _ = per_document_reference(model, ids, labels, LENGTHS)
    seqwrap.apply_minisequence(model)
    for kw in (dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu), dict(seq_idx=seq, position_ids=pos),
               dict(position_ids=pos, attention_mask=torch.ones_like(ids))):
        model(ids, labels=labels, **kw).loss.backward()
        assert max_rel_err(model, grads) <= TOL, kw
        model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()   # no boundaries: one sequence per row
    assert max_rel_err(model, grads) > 0.05


def test_refused_calls():
    model = tiny_model("llama", layers=1)
    ids, labels, pos, cu, _ = packed_batch(LENGTHS)
    seqwrap.apply_minisequence(model)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="restart between non-padding tokens of a padded batch"):
        model(ids, labels=labels, position_ids=pos, attention_mask=mask)
    with pytest.raises(ValueError, match="need use_cache=False"):
        model(ids, labels=labels, position_ids=pos, use_cache=True)
    with pytest.raises(ValueError, match="must restart at every document start"):
        model(ids, labels=labels, position_ids=torch.arange(24).expand(2, 24), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="must cover every row"):
        model(ids, labels=labels, cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1])
    assert all(p.grad is None for p in model.parameters())
