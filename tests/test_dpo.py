"""SeqwrapDPOTrainer (seqwrap/hf/dpo.py) against stock trl.DPOTrainer: one optimizer step (2 micro-batches of 2
preference pairs) on a tiny float64 Llama; same losses, same gradients (float64), for several loss types and
each kind of reference (adapter disabled, frozen "ref" adapter, ref_model, precomputed log-probs).

Stock DPOTrainer computes its per-token log-probs with a fused LM head whose accumulators are float32 even for a
float64 model; the reference here swaps that head (trl.trainer.dpo_trainer.add_fused_lm_head) for the same
outputs formed in float64 from HF's full forward logits."""
import types

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="trl is not installed (pip install seqwrap[dev] installs it)")
pytest.importorskip("peft")

from .test_trl import WORDS, lora_config, model, tokenizer  # noqa: E402


def pairs(n=8):
    """Preference pairs of different prompt / completion lengths (padding, per-row completion counts differ)."""
    g = torch.Generator().manual_seed(7)

    def words(k):
        return " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    rows = [(words(4 + i % 3), words(3 + (2 * i) % 5), words(2 + (3 * i) % 4)) for i in range(n)]
    return {"prompt": [p for p, _, _ in rows], "chosen": [" " + c for _, c, _ in rows],
            "rejected": [" " + r for _, _, r in rows]}


def f64_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """trl's add_fused_lm_head, formed in float64 from the full logits: model(..., labels=, fused_lm_head=True)
    returns per-token log_probs (B, T-1) (0 where the label is -100) and the metric fields."""
    original = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return original(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        logits = original(*args, **kwargs).logits[:, :-1] / temperature  # (B, T-1, V) float64
        target = labels[:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits, dim=-1)
        per_token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1) * mask
        return types.SimpleNamespace(log_probs=per_token, entropy=entropy.detach(),
                                     mean_logits=logits.mean(-1).detach(), is_top1=(logits.argmax(-1) == target) & mask, log_sum_sq_probs=None, aux_loss=None)

    model.forward = types.MethodType(forward, model)


def one_step(trainer_cls, tmp_path, monkeypatch, config=None, *, policy=None, **extra):
    """One optimizer step; returns (the two micro-batch losses, the trainable gradients before the optimizer step,
    the trainer). config: DPOConfig fields to change; policy: the model to train (default: a tiny Llama with LoRA
    through peft_config)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    monkeypatch.setattr(trl.trainer.dpo_trainer, "add_fused_lm_head", f64_fused_lm_head)
    grads, losses = {}, []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    fields = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, max_length=64, beta=0.7,
                  gradient_checkpointing=False, dataset_num_proc=None, bf16=False)
    args = trl.DPOConfig(**{**fields, **(config or {})})
    torch.manual_seed(0)
    if policy is None:
        policy, extra = model(), {"peft_config": lora_config(), **extra}
    trainer = trainer_cls(model=policy, args=args, train_dataset=Dataset.from_dict(pairs()),
                          processing_class=tokenizer(), callbacks=[Grab()], **extra)
    step = trainer.training_step

    def recording(*a, **k):
        loss = step(*a, **k)
        losses.append(loss.item())
        return loss

    trainer.training_step = recording
    trainer.train()
    return losses, grads, trainer


def compare(ref, got, rel=1e-10):
    (ref_losses, ref_grads, _), (losses, grads, trainer) = ref, got
    assert len(losses) == len(ref_losses) == 2
    assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-14)
    assert set(grads) == set(ref_grads) and len(grads) > 0
    worst = 0.0
    for n, g in grads.items():
        assert ref_grads[n].norm() > 0, n
        err = ((g - ref_grads[n]).norm() / ref_grads[n].norm()).item()
        worst = max(worst, err)
        assert err <= rel, (n, err)
    print(f"float64 vs stock DPOTrainer: losses {losses} vs {ref_losses}, worst relative gradient error {worst:.2e}")
    return worst


def seqwrap_cls():
    from seqwrap.integrations import SeqwrapDPOTrainer

    return SeqwrapDPOTrainer


LOSSES = {
    "sigmoid": {},
    "ipo": dict(loss_type=["ipo"]),
    "hinge_checkpointing": dict(loss_type=["hinge"], beta=0.2, gradient_checkpointing=True),
    "sft_mix": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"]),
    "robust_js": dict(loss_type=["robust"], label_smoothing=0.1, f_divergence_type="js_divergence"),
    "aot_apo": dict(loss_type=["aot", "apo_zero", "discopop"], loss_weights=[1.0, 0.3, 0.2]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_dpo_lora_equals_stock_dpo_trainer_in_float64(tmp_path, monkeypatch, name):
    """LoRA through peft_config, reference = the same model with the adapter disabled; chunks of 5 tokens."""
    ref = one_step(trl.DPOTrainer, tmp_path / "ref", monkeypatch, LOSSES[name])
    got = one_step(seqwrap_cls(), tmp_path / "seco", monkeypatch, LOSSES[name], seqwrap_chunk_size=5)
    assert all("lora_" in n for n in got[1]) and len(got[1]) == 8
    compare(ref, got)
    logged = [h for h in got[2].state.log_history if "loss" in h][0]
    assert logged["num_tokens"] > 0 and "rewards/margins" in logged and "entropy" not in logged


def test_dpo_fails_when_the_per_row_weights_are_lost(tmp_path, monkeypatch):
    """The comparison can fail: the same step with the objective's per-row weights c = dL/dS replaced by their
    mean (the chunk step of a loss that is not the DPO loss) gives other gradients."""
    from seqwrap.engines import objective

    ref = one_step(trl.DPOTrainer, tmp_path / "ref", monkeypatch)
    weights = objective.weights

    def averaged(fn, S, name):
        value, c = weights(fn, S, name)
        return value, torch.full_like(c, c.mean().item())

    monkeypatch.setattr(objective, "weights", averaged)
    got = one_step(seqwrap_cls(), tmp_path / "seco", monkeypatch, seqwrap_chunk_size=5)
    with pytest.raises(AssertionError):
        compare(ref, got)


def test_dpo_with_a_ref_model(tmp_path, monkeypatch):
    """An explicit ref_model (another random model): its sums come from its own chunked pass."""
    def ref_model():
        from .hf_tiny import tiny_model

        return tiny_model("llama", dtype=torch.float64, seed=3)

    ref = one_step(trl.DPOTrainer, tmp_path / "ref", monkeypatch, ref_model=ref_model())
    got = one_step(seqwrap_cls(), tmp_path / "seco", monkeypatch, ref_model=ref_model(), seqwrap_chunk_size=7)
    compare(ref, got)


def test_dpo_with_a_frozen_ref_adapter(tmp_path, monkeypatch):
    """A PeftModel without peft_config: DPOTrainer copies its adapter as a frozen "ref" adapter."""
    import peft

    def policy():
        torch.manual_seed(1)
        return peft.get_peft_model(model(), lora_config())

    ref = one_step(trl.DPOTrainer, tmp_path / "ref", monkeypatch, dict(loss_type=["ipo"]), policy=policy())
    got = one_step(seqwrap_cls(), tmp_path / "seco", monkeypatch, dict(loss_type=["ipo"]), policy=policy(),
                   seqwrap_chunk_size=6)
    assert "ref" in got[2].model.peft_config
    compare(ref, got)


def test_dpo_with_precomputed_reference_log_probs(tmp_path, monkeypatch):
    """precompute_ref_log_probs=True: the dataset's reference log-probs come from the chunked pass too."""
    cfg = dict(precompute_ref_log_probs=True)
    ref = one_step(trl.DPOTrainer, tmp_path / "ref", monkeypatch, cfg)
    got = one_step(seqwrap_cls(), tmp_path / "seco", monkeypatch, cfg, seqwrap_chunk_size=5)
    want = torch.tensor(ref[2].train_dataset["ref_chosen_logps"])
    have = torch.tensor(got[2].train_dataset["ref_chosen_logps"])
    assert torch.allclose(have, want, rtol=1e-12, atol=0)
    compare(ref, got)


@pytest.mark.parametrize("config, match", [
    (dict(use_weighting=True), "use_weighting"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(f_divergence_type="alpha_divergence"), "alpha_divergence"),
])
def test_dpo_refusals(tmp_path, monkeypatch, config, match):
    with pytest.raises(NotImplementedError, match=match):
        one_step(seqwrap_cls(), tmp_path, monkeypatch, config)
    with pytest.raises(NotImplementedError, match="spaco"):
        one_step(seqwrap_cls(), tmp_path, monkeypatch, seqwrap_engine="spaco")


def test_dpo_evaluation_loss_equals_stock(tmp_path, monkeypatch):
    """trainer.evaluate() (no compute_metrics: loss only) runs the chunked forward: the eval loss and reward
    metrics equal stock DPOTrainer's."""
    from datasets import Dataset

    monkeypatch.setattr(trl.trainer.dpo_trainer, "add_fused_lm_head", f64_fused_lm_head)

    def evaluate(cls, path, **extra):
        args = trl.DPOConfig(output_dir=str(path), per_device_eval_batch_size=4, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, max_length=64, beta=0.7, bf16=False, gradient_checkpointing=False)
        torch.manual_seed(0)
        trainer = cls(model=model(), args=args, train_dataset=Dataset.from_dict(pairs(4)),
                      eval_dataset=Dataset.from_dict(pairs(8)), processing_class=tokenizer(),
                      peft_config=lora_config(), **extra)
        return trainer.evaluate()

    want = evaluate(trl.DPOTrainer, tmp_path / "ref")
    got = evaluate(seqwrap_cls(), tmp_path / "seco", seqwrap_chunk_size=5)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-12)
    for key in ("eval_rewards/margins", "eval_rewards/chosen", "eval_logps/rejected"):
        assert got[key] == pytest.approx(want[key], rel=1e-10), key
    assert "eval_entropy" in want and "eval_entropy" not in got
