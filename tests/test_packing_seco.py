"""SeCO / SpaCO on packed rows equal training every document on its own (float64, 1e-9 relative):
the sum of the documents' token losses divided by the step's label count, and its gradients."""
import itertools
import math

import pytest
import torch

import seqwrap
from seqwrap.engines import kv_store

from .hf_tiny import max_rel_err, tiny_model
from .packed_utils import packed_batch, per_document_reference

TOL = 1e-9
ALIGNED = [[6, 6, 12], [12, 6, 6]]        # with chunk 6 no chunk boundary falls inside a document
MIXED = [[2, 1, 4, 9, 8], [24]]          # documents shorter than a chunk, a 1-token one, one over many chunks
CASES = [(ALIGNED, 6), (ALIGNED, 4), (MIXED, 5), (MIXED, 7)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check(model, engine, lengths, **kw):
    ids, labels, pos, cu, seq = packed_batch(lengths)
    loss, grads, count = per_document_reference(model, ids, labels, lengths)
    out = engine(ids, labels=labels, position_ids=pos, **kw)
    assert abs(out.loss.item() - loss.item()) <= TOL * abs(loss.item())
    assert out.num_items == count
    err = max_rel_err(model, grads)
    assert err <= TOL, f"gradient relative error {err:.3g}"
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2"])  # mistral, gemma2: sliding window
@pytest.mark.parametrize("lengths, chunk", CASES, ids=["aligned-6", "aligned-4", "mixed-5", "mixed-7"])
@pytest.mark.parametrize("engine", ["seco", "spaco"])
def test_equals_each_document_alone(family, lengths, chunk, engine):
    model = tiny_model(family)
    eng = seqwrap.SeCO(model, chunk_size=chunk) if engine == "seco" else seqwrap.SpaCO(
        model, chunk_size=chunk, rate=1.0, seed=0)
    out = check(model, eng, lengths)
    assert out.num_chunks == -(-24 // chunk) == out.backward_chunks


@pytest.mark.parametrize("convention", ["cu_seqlens", "seq_idx", "flattening_keys", "cu_seqlens_no_positions"])
def test_boundary_conventions(convention):
    model = tiny_model("llama")
    ids, labels, pos, cu, seq = packed_batch(MIXED)
    loss, grads, _ = per_document_reference(model, ids, labels, MIXED)
    kw = {"cu_seqlens": dict(cu_seqlens=cu, position_ids=pos), "seq_idx": dict(seq_idx=seq, position_ids=pos),
          "flattening_keys": dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9,
                                  position_ids=pos),
          "cu_seqlens_no_positions": dict(cu_seqlens=cu)}[convention]  # positions restart by themselves
    out = seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels, **kw)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL


def test_without_boundaries_the_documents_mix():
    """The check above can fail: the same rows read as single sequences give other gradients."""
    model = tiny_model("llama")
    ids, labels, pos, _, _ = packed_batch(MIXED)
    _, grads, _ = per_document_reference(model, ids, labels, MIXED)
    seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels)
    assert max_rel_err(model, grads) > 0.05


def test_past_of_other_documents_is_never_read_or_kept(monkeypatch):
    """Chunks aligned with documents: no past chunk is read and no K/V is kept; mixed: only the chunks
    a later chunk shares a document with are kept and read."""
    kept, read = [], []
    keep, blocks = kv_store.ChunkKVStore._keep, kv_store.ChunkKVStore.past_blocks

    def spy_keep(self, t):
        kept.append(self.chunk)
        return keep(self, t)

    def spy_blocks(self, layer, dtype, device):
        for j, k, v, mask in blocks(self, layer, dtype, device):
            read.append((self.chunk, j))
            yield j, k, v, mask

    monkeypatch.setattr(kv_store.ChunkKVStore, "_keep", spy_keep)
    monkeypatch.setattr(kv_store.ChunkKVStore, "past_blocks", spy_blocks)
    model = tiny_model("llama", layers=1)
    check(model, seqwrap.SeCO(model, chunk_size=6), [[6, 6, 12], [6, 6, 12]])
    assert read == [(3, 2), (3, 2)]                # the 12-token documents: chunk 3 reads chunk 2 (pass 1, 2)
    assert sorted(set(kept)) == [2]
    kept.clear(), read.clear()
    check(model, seqwrap.SeCO(model, chunk_size=5), [[2, 1, 2, 10, 4, 5]])
    # chunks [0,5) [5,10) [10,15) [15,20) [20,24); documents end at 2, 3, 5, 15, 19, 24
    assert sorted(set(kept)) == [1, 3]
    assert sorted(set(read)) == [(2, 1), (4, 3)]


def test_lora_checkpointing_offload():
    peft = pytest.importorskip("peft")
    from seqwrap.hf.compat import enable_checkpointing

    model = tiny_model("qwen3")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    model.train()
    enable_checkpointing(model)
    check(model, seqwrap.SeCO(model, chunk_size=5, offload=True, offload_min_bytes=0), MIXED)


def test_padding_with_explicit_boundaries():
    """A padded tail (attention_mask 0) as its own document, as seqwrap.data.pack_documents makes it."""
    model = tiny_model("mistral")
    lengths = [[7, 9, 8], [10, 14]]        # row 0: the last 8 tokens are padding
    ids, labels, pos, cu, _ = packed_batch(lengths)
    mask = torch.ones_like(ids)
    mask[0, 16:] = 0
    labels[0, 16:] = -100
    loss, grads, _ = per_document_reference(model, ids, labels, [[7, 9], [10, 14]])
    out = seqwrap.SeCO(model, chunk_size=5)(ids, labels=labels, attention_mask=mask, position_ids=pos,
                                             cu_seqlens=cu)
    assert abs(out.loss.item() - loss.item()) <= TOL * loss.item()
    assert max_rel_err(model, grads) <= TOL
    assert out.num_tokens == 40


def test_spaco_stays_unbiased_on_packed_rows():
    """E[gradient] over all 2^k Bernoulli selections (weights 1/q) equals the per-document gradient."""
    from .hf_tiny import reference  # noqa: F401  (same model set-up as the other SpaCO tests)

    model = tiny_model("llama", pure64=True)
    lengths = [[3, 7, 6]]
    ids, labels, pos, _, _ = packed_batch(lengths, holes=False)
    _, grads, _ = per_document_reference(model, ids, labels, lengths)
    exact = torch.cat([grads[n].reshape(-1) for n, p in model.named_parameters()])
    q = [0.4, 0.8, 0.6, 0.5]
    mean = torch.zeros_like(exact)
    for keep in itertools.product([0, 1], repeat=4):
        prob = math.prod(qi if k else 1 - qi for qi, k in zip(q, keep))
        engine = seqwrap.SpaCO(model, chunk_size=4, rate=1.0, seed=0)
        engine.chunk_weights = lambda counts, keep=keep: [1 / qi if k else 0.0 for qi, k in zip(q, keep)]
        model.zero_grad(set_to_none=True)
        engine(ids, labels=labels, position_ids=pos)
        if any(p.grad is not None for p in model.parameters()):
            mean += prob * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert ((mean - exact).norm() / exact.norm()).item() <= 1e-10


def test_bad_inputs_touch_nothing():
    model = tiny_model("llama", layers=1)
    ids, labels, pos, cu, seq = packed_batch(MIXED)
    engine = seqwrap.SeCO(model, chunk_size=5)
    with pytest.raises(ValueError, match="must cover every row"):
        engine(ids, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="ends at 47 but the batch has 2 x 24 = 48 tokens"):
        engine(ids, cu_seqlens=torch.cat([cu[:-1], cu[-1:] - 1]))
    bad = pos.clone()
    bad[1, 10] = 0   # the second row is one document by cu_seqlens
    with pytest.raises(ValueError, match="position_ids contradict cu_seqlens: tokens 9 and 10 of row 1"):
        engine(ids, position_ids=bad, cu_seqlens=cu)
    with pytest.raises(ValueError, match="position_ids contradict seq_idx"):
        engine(ids, position_ids=bad, seq_idx=seq)
    with pytest.raises(ValueError, match="cu_seq_lens_k and cu_seq_lens_q describe different"):
        engine(ids, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 24, 48]))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="restart between non-padding tokens of a padded batch"):
        engine(ids, position_ids=pos, attention_mask=mask)
    with pytest.raises(ValueError, match="need attention='chunked'"):
        seqwrap.SeCO(model, chunk_size=5, attention="concat")(ids, position_ids=pos)
    with pytest.raises(TypeError, match="unexpected keyword"):
        engine(ids, cu_seqlen=cu)
    assert all(p.grad is None for p in model.parameters()), "a refused call must not touch gradients"
