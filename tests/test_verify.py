"""seqwrap.verify: exact on what is exact, and able to fail.

A broken engine (a scaled MLP gradient, a dropped K/V gradient relay) must come out `wrong`, naming the
bad parameter group; refusals must be seqwrap's own and leave .grad untouched; anything else is `error`."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqwrap  # noqa: E402
from seqwrap.engines import kv_store, seco  # noqa: E402

transformers.logging.set_verbosity_error()


def llama():
    return transformers.LlamaConfig()


def test_llama_is_exact_under_seco_and_mst():
    for engine in ("seco", "mst"):
        report = seqwrap.verify(llama(), engine=engine)
        assert report.status == "exact" and report.passed, str(report)
        assert {"embeddings", "attention", "mlp", "norms", "head"} <= set(report.groups)
        assert report.worst_error < 1e-12 and report.loss_error < 1e-12
        assert report.groups["attention"].count == 8  # q, k, v, o of 2 layers


def test_a_model_and_its_config_give_the_same_check():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_attention_heads=4,
                                                                   intermediate_size=40, num_hidden_layers=3,
                                                                   vocab_size=300))
    report = seqwrap.verify(model)
    assert report.passed and report.model_class == "LlamaForCausalLM"
    assert "hidden 32" in report.twin  # sizes under the caps are kept
    assert "2 layers" in report.twin  # three identical layers: two of them keep the pattern
    assert model.lm_head.weight.grad is None  # the user's model is not touched


class ScaledMLP(seco.SeCO):
    """A broken engine: every MLP gradient comes out 0.1% too large."""

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        for name, p in self.model.named_parameters():
            if ".mlp." in name and p.grad is not None:
                p.grad.mul_(1.001)
        return out


def test_a_scaled_gradient_is_wrong_and_names_its_group(monkeypatch):
    monkeypatch.setattr(seqwrap.engines, "SeCO", ScaledMLP, raising=False)
    report = seqwrap.verify(llama())
    assert report.status == "wrong" and not report.passed, str(report)
    assert report.bad_groups() == ["mlp"], str(report)
    assert report.groups["mlp"].worst == pytest.approx(1e-3, rel=1e-6)
    assert report.worst_group == "mlp" and ".mlp." in report.worst_param
    assert "<-- above rtol" in str(report) and "WRONG" in str(report)


def test_a_dropped_kv_relay_is_wrong_though_the_loss_is_right(monkeypatch):
    monkeypatch.setattr(kv_store.ChunkKVStore, "relay_pairs", lambda self, chunk: [])
    report = seqwrap.verify(llama())
    assert report.status == "wrong", str(report)
    assert report.loss_error < 1e-12  # the loss cannot see it: only the gradients do
    assert "attention" in report.bad_groups() and report.groups["attention"].worst > 1e-3


def test_a_refusal_is_reported_with_its_reason_and_grads_untouched():
    report = seqwrap.verify(transformers.GPTNeoXConfig(), engine="mst")  # not an MsT family
    assert report.status == "refused" and not report.passed
    assert report.exception == "ValueError" and "apply_minisequence" in report.message
    assert "minisequence.py" in report.where
    falcon = seqwrap.verify(transformers.FalconMambaConfig())
    assert falcon.status == "refused" and "falcon_mamba" in falcon.message


def test_a_failure_mid_step_is_an_error_not_a_refusal(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("chunk 2 blew up")

    monkeypatch.setattr(seco, "chunk_loss_sum", boom)
    report = seqwrap.verify(llama())
    assert report.status == "error" and report.exception == "RuntimeError" and "blew up" in report.message


def test_a_value_error_raised_outside_seqwrap_is_an_error_not_a_refusal(monkeypatch):
    """Only seqwrap's own code refuses: the same exception type raised elsewhere (here: this test file,
    standing for the model's forward) during the step is an error."""
    def fail(self, hidden, labels):
        raise ValueError("the model itself failed")

    monkeypatch.setattr(seco.SeCO, "_loss_sum", fail)
    report = seqwrap.verify(llama())
    assert report.status == "error" and report.exception == "ValueError", str(report)
    assert "test_verify.py" in report.where


def test_a_twin_whose_own_backprop_fails_cannot_be_checked(monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError("broken forward")

    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaMLP, "forward", fail)
    report = seqwrap.verify(llama())
    assert report.status == "cannot-build" and not report.passed
    assert "full backprop of the twin fails" in report.message and "broken forward" in report.message


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="engine"):
        seqwrap.verify(llama(), engine="spaco-ish")
    with pytest.raises(ValueError, match="seq_len"):
        seqwrap.verify(llama(), seq_len=2)
