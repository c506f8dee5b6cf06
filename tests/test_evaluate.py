"""Forward-only evaluation (SeCO.evaluate, an engine call under no_grad, SeqwrapTrainer's evaluation): the loss
of full forward in float64, chunk by chunk, and no gradient written."""
import pytest
import torch

import seqwrap
from seqwrap.hf.float64 import pure_float64

from .exact_families import batch, build, labels_of
from .test_exactness import MOE

pytest.importorskip("transformers")


def full_loss(model, ids, mask):
    with torch.no_grad(), pure_float64():
        return model(ids, labels=labels_of(ids, mask), attention_mask=mask).loss.item()


def no_grad_written(model):
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_evaluate_is_the_full_forward_loss(chunk):
    model = build("llama")
    ids, mask = batch(T=23, pad=5)
    with pure_float64():
        out = seqwrap.SeCO(model, chunk_size=chunk).evaluate(ids, labels=labels_of(ids, mask), attention_mask=mask)
    assert out.loss.item() == pytest.approx(full_loss(model, ids, mask), rel=1e-12, abs=0)
    assert out.backward_chunks == 0 and out.num_chunks == -(-23 // chunk)
    assert out.num_tokens == int(mask.sum()) and out.num_items == float((labels_of(ids, mask)[:, 1:] != -100).sum())
    assert no_grad_written(model)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_an_engine_call_without_grad_only_evaluates(context):
    model = build("llama")
    ids, _ = batch(T=20)
    engine = seqwrap.SeCO(model, chunk_size=6)
    with context(), pure_float64():
        out = engine(ids)
    assert out.loss.item() == pytest.approx(full_loss(model, ids, None), rel=1e-12, abs=0)
    assert out.backward_chunks == 0 and no_grad_written(model)
    with pure_float64():  # and with grad, the same engine still trains
        assert engine(ids).backward_chunks == 4
    assert not no_grad_written(model)


def test_evaluate_includes_the_router_aux_loss():
    model = build("mixtral", output_router_logits=True, experts_implementation="eager", **MOE["mixtral"])
    ids, mask = batch(T=21, pad=4)
    with torch.no_grad():
        aux = 0.5 * model(ids, attention_mask=mask).aux_loss.item()
    assert aux > 1e-3  # large enough that leaving it out would fail the comparison
    with torch.inference_mode(), pure_float64():
        out = seqwrap.SeCO(model, chunk_size=5).evaluate(ids, labels=labels_of(ids, mask), attention_mask=mask)
    assert out.loss.item() == pytest.approx(full_loss(model, ids, mask), rel=1e-12, abs=0)
    assert no_grad_written(model)


def test_spaco_evaluates_every_chunk_without_drawing():
    model = build("llama")
    ids, _ = batch(T=20)
    engine = seqwrap.SpaCO(model, chunk_size=5, rate=0.25, seed=1)
    with pure_float64():
        out = engine.evaluate(ids)
    assert out.loss.item() == pytest.approx(full_loss(model, ids, None), rel=1e-12, abs=0)
    assert engine.step == 0 and no_grad_written(model)  # the sampler's step did not move


def test_evaluate_switches_to_concat_where_needed():
    model = build("diffllama")
    ids, mask = batch(T=20, pad=2)
    engine = seqwrap.SeCO(model, chunk_size=6)
    with pytest.warns(UserWarning, match="uses attention='concat'"), pure_float64():
        out = engine.evaluate(ids, labels=labels_of(ids, mask), attention_mask=mask)
    assert engine.attention == "concat"
    assert out.loss.item() == pytest.approx(full_loss(model, ids, mask), rel=1e-12, abs=0)


def test_evaluate_refuses_bad_input_like_a_step():
    model = build("llama")
    engine = seqwrap.SeCO(model, chunk_size=6)
    with pytest.raises(ValueError, match="outside"):
        engine.evaluate(torch.full((1, 8), 3), labels=torch.full((1, 8), 10_000))
    with pytest.raises(TypeError, match="unexpected keyword"):
        engine.evaluate(torch.full((1, 8), 3), cu_seqlen=None)


def test_trainer_evaluation_uses_the_engine(tmp_path):
    from transformers import Trainer, TrainingArguments

    from seqwrap.integrations import SeqwrapTrainer

    rows = []
    for seed in range(4):
        ids, _ = batch(B=1, T=18, seed=seed)
        rows.append({"input_ids": ids[0], "labels": ids[0], "attention_mask": torch.ones(18, dtype=torch.long)})
    results = {}
    for cls, extra in ((Trainer, {}), (SeqwrapTrainer, dict(seqwrap_chunk_size=5))):
        model = build("llama")
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), per_device_eval_batch_size=2,
                                 report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = cls(model=model, args=args, eval_dataset=rows, **extra)
        if cls is SeqwrapTrainer:  # the engine's path, not the stock forward
            calls = []
            engine = trainer._seqwrap_engine_for(trainer.model)
            original = engine.evaluate
            engine.evaluate = lambda *a, **k: calls.append(1) or original(*a, **k)
        results[cls] = trainer.evaluate()["eval_loss"]
        assert no_grad_written(model)
    assert len(calls) == 2  # two batches of two rows
    # the stock loss upcasts logits to float32: agreement to float32 accuracy
    assert results[SeqwrapTrainer] == pytest.approx(results[Trainer], rel=1e-6)


def test_adjoint_sharding_evaluates_forward_only():
    from .mamba_utils import tiny_mamba

    model = tiny_mamba(layers=2, seed=7)
    ids = torch.randint(0, 50, (2, 29), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ref = model(ids, labels=labels).loss.item()  # HF's loss from float32 logits
    engine = seqwrap.AdjointSharding(model, chunk_size=6)
    out = engine.evaluate(ids, labels)
    assert out.loss.item() == pytest.approx(ref, rel=1e-6) and out.num_chunks == 5
    with torch.inference_mode():
        assert engine(ids, labels).loss.item() == pytest.approx(ref, rel=1e-6)
    assert no_grad_written(model)
