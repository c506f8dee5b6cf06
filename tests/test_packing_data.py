"""Building packed batches: seqwrap.data.pack_documents, and transformers' DataCollatorWithFlattening's
real output consumed as it is by SeCO, AdjointSharding and SeqwrapTrainer (float64, against every
document trained alone)."""
import pytest
import torch

import seqwrap
from seqwrap.data import pack_documents

from .hf_tiny import VOCAB, max_rel_err, tiny_model
from .packed_utils import per_document_reference

transformers = pytest.importorskip("transformers")
TOL = 1e-9


def documents(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def rows_of(batch):
    """Per row, the document lengths (padding tail included) from cu_seqlens."""
    cu = batch.cu_seqlens.tolist()
    row_len = batch.input_ids.shape[1]
    out, cur = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        cur.append(b - a)
        if b % row_len == 0:
            out.append(cur)
            cur = []
    return out


def test_pack_documents_layout():
    docs = documents([7, 3, 12, 5, 9, 1, 4])
    batch = pack_documents(docs, row_len=16)
    assert batch.input_ids.shape == (3, 16) and batch.num_tokens == 41
    for i, doc in enumerate(docs):
        (r, s, e), = batch.placement[i]
        assert torch.equal(batch.input_ids[r, s:e], doc)
        assert batch.position_ids[r, s:e].tolist() == list(range(len(doc)))
        assert batch.labels[r, s] == -100 and torch.equal(batch.labels[r, s + 1:e], doc[1:])
    pad = batch.attention_mask == 0
    assert (batch.labels[pad] == -100).all() and (batch.input_ids[pad] == 0).all()
    assert sum(sum(r) for r in rows_of(batch)) == 48
    greedy = pack_documents(docs, row_len=16, strategy="greedy")
    assert greedy.input_ids.shape[0] >= batch.input_ids.shape[0]
    assert [len(p) for p in pack_documents(documents([40]), 16, overflow="split").placement] == [3]
    assert pack_documents(documents([40]), 16, overflow="truncate").num_tokens == 16
    with pytest.raises(ValueError, match="document 0 has 40 tokens, more than row_len=16"):
        pack_documents(documents([40]), 16)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        pack_documents([torch.zeros(3)], 16)
    with pytest.raises(ValueError, match="no non-empty document"):
        pack_documents([[]], 16)


def test_pack_documents_trains_every_document_alone():
    model = tiny_model("mistral")
    batch = pack_documents(documents([7, 3, 12, 5, 9, 1, 4], seed=1), row_len=16)
    loss, grads, count = per_document_reference(model, batch.input_ids, batch.labels, rows_of(batch))
    out = seqwrap.SeCO(model, chunk_size=5)(**batch.inputs())
    assert out.num_items == count
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


def collated(lengths, seed=2, vocab=VOCAB, **options):
    from transformers import DataCollatorWithFlattening

    docs = documents(lengths, seed=seed, vocab=vocab)
    feats = [{"input_ids": d.tolist()} for d in docs]
    return DataCollatorWithFlattening(**options)(feats), docs


@pytest.mark.parametrize("options", [{}, {"return_flash_attn_kwargs": True}, {"return_seq_idx": True},
                                     {"return_flash_attn_kwargs": True, "return_seq_idx": True}],
                         ids=["default", "flash-kwargs", "seq-idx", "both"])
def test_data_collator_with_flattening(options):
    lengths = [6, 1, 9, 4, 8]
    batch, _ = collated(lengths, **options)
    assert set(batch) >= {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (1, 28)
    model = tiny_model("qwen3")
    loss, grads, _ = per_document_reference(model, batch["input_ids"], batch["labels"], [lengths])
    out = seqwrap.SeCO(model, chunk_size=5)(**batch)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


def test_data_collator_with_flattening_mamba():
    from .mamba_utils import grads_of, tiny_mamba

    lengths = [6, 1, 9, 4, 8]
    batch, docs = collated(lengths, vocab=50, return_flash_attn_kwargs=True)
    model = tiny_mamba(layers=1)   # vocabulary 50
    rows = torch.zeros(len(docs), 9, dtype=torch.long)
    targets = torch.full((len(docs), 9), -100)
    for r, d in enumerate(docs):
        rows[r, :len(d)] = d
        targets[r, 1:len(d)] = d[1:]
    count = int((targets != -100).sum())
    model(rows, labels=targets, num_items_in_batch=count).loss.backward()   # every document alone
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    out = seqwrap.AdjointSharding(model, chunk_size=7)(**batch)
    assert out.num_tokens == count
    got = grads_of(model)
    assert max(((got[n] - r).norm() / r.norm()).item() for n, r in ref.items()) <= TOL


def test_trainer_step_on_collator_batches(tmp_path):
    from transformers import DataCollatorWithFlattening, TrainingArguments

    from seqwrap.integrations import SeqwrapTrainer

    lengths = [6, 1, 9, 4, 8]
    batch, _ = collated(lengths, return_flash_attn_kwargs=True, return_seq_idx=True)
    model = tiny_model("llama")
    _, grads, count = per_document_reference(model, batch["input_ids"], batch["labels"], [lengths])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SeqwrapTrainer(model=model, args=args, data_collator=DataCollatorWithFlattening(),
                             seqwrap_chunk_size=5)
    trainer.training_step(model, dict(batch), num_items_in_batch=torch.tensor(count))
    assert max_rel_err(model, grads) <= TOL


def test_rows_one_by_one_accumulate_to_the_batch():
    """PackedBatch.rows(r): one row per call with the step's label count as normaliser gives the whole
    batch's gradients (gradient accumulation over packed rows)."""
    model = tiny_model("llama")
    batch = pack_documents(documents([7, 3, 12, 5, 9, 1, 4], seed=3), row_len=16)
    engine = seqwrap.SeCO(model, chunk_size=6)
    engine(**batch.inputs())
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for r in range(batch.input_ids.shape[0]):
        engine(**batch.rows(r), num_items=batch.num_labels)
    assert max_rel_err(model, whole) <= 1e-12
