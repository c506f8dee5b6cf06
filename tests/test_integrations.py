"""SeqwrapTrainer: same trajectory as the stock Trainer (SeCO is exact), gradient accumulation and logging kept."""
import pytest
import torch

from .hf_tiny import VOCAB, tiny_model

pytest.importorskip("transformers")


def dataset(n=8, length=20):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: 3 + i % 4] = -100  # different label counts per row: exercises num_items_in_batch
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(length, dtype=torch.long)})
    return rows


def train(trainer_cls, tmp_path, **extra):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset(), **extra)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_trainer_matches_stock_trainer(tmp_path):
    from transformers import Trainer

    from seqwrap.integrations import SeqwrapTrainer

    ref_model, ref_losses = train(Trainer, tmp_path / "ref")
    model, losses = train(SeqwrapTrainer, tmp_path / "seco", seqwrap_engine="seco", seqwrap_chunk_size=6)
    assert len(losses) == len(ref_losses) == 3
    assert losses == pytest.approx(ref_losses, rel=1e-6)  # logged values are rounded by the Trainer
    # the stock Trainer's loss upcasts logits with .float(): float32 accuracy for this float64 model
    start = tiny_model("llama", dtype=torch.float64)
    for (n, p), q, p0 in zip(model.named_parameters(), ref_model.parameters(), start.parameters()):
        moved = (q - p0).norm()
        assert moved > 0, n
        assert (p - q).norm() <= 1e-5 * moved, n


def test_trainer_spaco_runs_and_logs(tmp_path):
    from seqwrap.integrations import SeqwrapTrainer

    model, losses = train(SeqwrapTrainer, tmp_path, seqwrap_engine="spaco", seqwrap_chunk_size=5,
                          seqwrap_options={"rate": 0.5, "seed": 0})
    assert len(losses) == 3 and all(l > 0 for l in losses)


def test_trainer_bad_engine(tmp_path):
    from transformers import TrainingArguments

    from seqwrap.integrations import SeqwrapTrainer

    with pytest.raises(ValueError, match="seqwrap_engine must be one of"):
        SeqwrapTrainer(model=tiny_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                       seqwrap_engine="full")
