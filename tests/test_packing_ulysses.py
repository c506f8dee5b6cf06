"""Ulysses with packed rows on 2 gloo processes (float64): shard_batch carries the documents of the whole
sequence; plain Ulysses attention and SeCO / SpaCO under Ulysses equal every document trained alone."""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist_utils import run_distributed
from .hf_tiny import tiny_model
from .packed_utils import packed_batch, per_document_reference

pytest.importorskip("transformers")

LENGTHS = [[6, 2, 9, 7], [3, 21]]   # 2 rows of 24 tokens
CASES = [("llama", None), ("mistral", None), ("mistral", 5)]       # (family, apply_ulysses chunk_size)
ENGINES = [("llama", "seco", 6), ("mistral", "seco", 8), ("qwen3", "spaco", 6)]


def batch():
    ids, labels, pos, cu, seq = packed_batch(LENGTHS, seed=4)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}, cu, seq


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_step(family, chunk_size):
    """model(...) on this rank's shard, the loss formed in float64 from the logits; summed over ranks."""
    import seqwrap.parallel as sp

    model = tiny_model(family)
    sp.apply_ulysses(model, chunk_size=chunk_size)
    data, _, _ = batch()
    shard = sp.shard_batch(data)
    logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"],
                   cu_seq_lens_q=shard["cu_seq_lens_q"], cu_seq_lens_k=shard["cu_seq_lens_k"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shard["shift_labels"].flatten(), reduction="sum")
    loss = loss / shard["num_items_in_batch"]
    loss.backward()
    sp.allreduce_gradients(model)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item(), grads(model)


def engine_step(family, engine, chunk):
    import seqwrap
    import seqwrap.parallel as sp

    model = tiny_model(family)
    sp.apply_ulysses(model)
    data, cu, _ = batch()
    shard = sp.shard_batch({**data, "cu_seqlens": cu}, chunk_size=chunk)   # both conventions: they must agree
    cls = seqwrap.SeCO if engine == "seco" else seqwrap.SpaCO
    kw = dict(rate=1.0, seed=0) if engine == "spaco" else {}
    out = cls(model, chunk_size=chunk, **kw)(**shard)
    return out.loss.item(), out.num_items, grads(model)


def refused():
    """Shards whose positions restart but which carry no boundaries are refused, by both paths."""
    import seqwrap
    import seqwrap.parallel as sp

    errors = []
    data, _, _ = batch()
    shard = sp.shard_batch(data)
    model = tiny_model("llama")
    sp.apply_ulysses(model)
    for call in (lambda: model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]),
                 lambda: seqwrap.SeCO(model, chunk_size=6)(**{k: v for k, v in sp.shard_batch(data, chunk_size=6)
                                                            .items() if not k.startswith("cu_")})):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def worker(rank, world):
    torch.set_num_threads(1)
    return {"plain": [plain_step(f, c) for f, c in CASES], "engines": [engine_step(*e) for e in ENGINES],
            "refused": refused()}


@functools.lru_cache(maxsize=None)
def results():
    return run_distributed(worker, 2)


def reference(family):
    model = tiny_model(family)
    data, _, _ = batch()
    loss, ref, count = per_document_reference(model, data["input_ids"], data["labels"], LENGTHS)
    return loss.item(), ref, count


def assert_grads(got, ref, what):
    assert set(got) == set(ref), what
    for n, g in got.items():
        err = ((g - ref[n]).norm() / ref[n].norm()).item()
        assert err <= 1e-9, f"{what} {n}: {err:.3g}"


def test_plain_ulysses_attention_keeps_documents_apart():
    for i, (family, chunk) in enumerate(CASES):
        loss, ref, _ = reference(family)
        for rank, res in enumerate(results()):
            got_loss, got = res["plain"][i]
            assert abs(got_loss - loss) <= 1e-9 * abs(loss), (family, chunk, rank)
            assert_grads(got, ref, f"{family} chunk {chunk} rank {rank}")


def test_seco_and_spaco_under_ulysses():
    for i, (family, engine, chunk) in enumerate(ENGINES):
        loss, ref, count = reference(family)
        for rank, res in enumerate(results()):
            got_loss, num_items, got = res["engines"][i]
            assert num_items == count
            assert abs(got_loss - loss) <= 1e-9 * abs(loss), (family, engine, rank)
            assert_grads(got, ref, f"{family} {engine} rank {rank}")


def test_shards_without_boundaries_are_refused():
    for res in results():
        plain, engine = res["refused"]
        assert plain is not None and "carries no document boundaries" in plain
        assert engine is not None and "no boundaries of the whole sequence" in engine
