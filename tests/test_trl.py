"""SeqwrapSFTTrainer (seqwrap/hf/trl.py) against stock trl.SFTTrainer: one optimizer step on a tiny Llama
with LoRA through peft_config and a small in-memory text dataset; same loss, same gradients."""
import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="trl is not installed (pip install seqwrap[dev] installs it)")
pytest.importorskip("peft")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "and", "then", "slept", "quickly"]


def tokenizer():
    """A word-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def texts(n=8):
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        length = 9 + 3 * (i % 4)  # different lengths: padding and per-row label counts differ
        out.append(" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (length,), generator=g).tolist()))
    return out


def model():
    from .hf_tiny import tiny_model

    m = tiny_model("llama", dtype=torch.float64)
    m.config.pad_token_id, m.config.bos_token_id, m.config.eos_token_id = 0, 2, 3
    return m


def lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM")  # random B: A gets gradients too


def one_step(trainer_cls, tmp_path, config=None, **extra):
    """Runs one optimizer step (2 micro-batches of 2 rows); returns (the two micro-batch losses, the
    LoRA gradients just before the optimizer step). config: SFTConfig fields to change."""
    from datasets import Dataset
    from transformers import TrainerCallback

    grads, losses = {}, []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    fields = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, max_length=64,
                  dataset_text_field="text", packing=False)
    args = trl.SFTConfig(**{**fields, **(config or {})})
    torch.manual_seed(0)
    trainer = trainer_cls(model=model(), args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                          processing_class=tokenizer(), peft_config=lora_config(), callbacks=[Grab()], **extra)
    step = trainer.training_step

    def recording(*a, **k):
        loss = step(*a, **k)
        losses.append(loss.item())
        return loss

    trainer.training_step = recording
    trainer.train()
    return losses, grads, trainer


def nll_f64(outputs, labels, num_items_in_batch=None):
    """SFT's 'nll' loss (summed token losses / num_items_in_batch), formed in float64 from the logits."""
    logits = outputs.logits
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift.flatten().to(logits.device), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (shift != -100).sum())


@pytest.fixture(scope="module")
def seqwrap_step(tmp_path_factory):
    from seqwrap.integrations import SeqwrapSFTTrainer

    return one_step(SeqwrapSFTTrainer, tmp_path_factory.mktemp("seco"), seqwrap_engine="seco", seqwrap_chunk_size=5)


def test_sft_drop_in_equals_stock_sft_trainer_in_float64(tmp_path, seqwrap_step):
    """Stock SFTTrainer, plain backprop, its 'nll' loss formed in float64 (compute_loss_func): equal to
    float64 accuracy."""
    ref_losses, ref_grads, _ = one_step(trl.SFTTrainer, tmp_path, compute_loss_func=nll_f64)
    losses, grads, trainer = seqwrap_step
    assert len(losses) == len(ref_losses) == 2
    assert set(grads) == set(ref_grads) and all("lora_" in n for n in grads) and len(grads) == 8
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for n, g in grads.items():
        assert g.norm() > 0, n
        assert (g - ref_grads[n]).norm() <= 1e-10 * ref_grads[n].norm(), n
    logged = [h for h in trainer.state.log_history if "loss" in h][0]
    assert logged["num_tokens"] > 0


def test_sft_drop_in_close_to_stock_sft_fused_loss(tmp_path, seqwrap_step):
    """Stock SFTTrainer's default loss (its fused LM head, float32 accumulators even for this float64
    model): equal to float32 accuracy (measured: 1.7e-5 on the loss, 4e-3 on the smallest LoRA gradient)."""
    ref_losses, ref_grads, _ = one_step(trl.SFTTrainer, tmp_path)
    losses, grads, _ = seqwrap_step
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    total = sum(((grads[n] - ref_grads[n]) ** 2).sum() for n in grads).sqrt()
    assert total <= 1e-2 * sum((r ** 2).sum() for r in ref_grads.values()).sqrt()


PACKED = {
    "padding_free": dict(padding_free=True, max_length=None),
    "bfd": dict(packing=True, packing_strategy="bfd", max_length=40),
    "wrapped": dict(packing=True, packing_strategy="wrapped", max_length=40),
}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_sft_equals_stock_sft_trainer_in_float64(tmp_path, name):
    """TRL's padding-free rows (several documents per row, position_ids restarting, no attention mask) and
    its packing strategies, against stock SFTTrainer on the same rows with the 'nll' loss in float64."""
    from seqwrap.integrations import SeqwrapSFTTrainer

    seen = []

    class Spy(SeqwrapSFTTrainer):
        def _seqwrap_after_step(self, inputs, out):
            seen.append((tuple(inputs["input_ids"].shape), "position_ids" in inputs, "attention_mask" in inputs))
            super()._seqwrap_after_step(inputs, out)

    ref_losses, ref_grads, _ = one_step(trl.SFTTrainer, tmp_path / "ref", PACKED[name], compute_loss_func=nll_f64)
    losses, grads, trainer = one_step(Spy, tmp_path / "seco", PACKED[name], seqwrap_engine="seco",
                                      seqwrap_chunk_size=7)
    if name != "wrapped":  # a packed row of several documents reached the engine, no mask
        assert all(shape[0] == 1 and pos and not mask for shape, pos, mask in seen), seen
    assert len(losses) == len(ref_losses) == 2
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    assert set(grads) == set(ref_grads) and len(grads) == 8
    for n, g in grads.items():
        assert g.norm() > 0, n
        assert (g - ref_grads[n]).norm() <= 1e-10 * ref_grads[n].norm(), n


@pytest.mark.parametrize("option,match", [
    ({"loss_type": "dft"}, "loss_type='dft'"),
    ({"activation_offloading": True}, "activation_offloading"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
])
def test_sft_refuses_what_the_chunked_step_cannot_do(tmp_path, option, match):
    from datasets import Dataset

    from seqwrap.integrations import SeqwrapSFTTrainer

    args = trl.SFTConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "report_to": [], "use_cpu": True,
                            "max_length": 64, **option})
    with pytest.raises(NotImplementedError, match=match):
        SeqwrapSFTTrainer(model=model(), args=args, train_dataset=Dataset.from_dict({"text": texts(2)}),
                          processing_class=tokenizer())
