"""apply_minisequence / remove_minisequence: refusals, inference unchanged, undo, wrappers, hooks."""
import copy
import warnings

import pytest
import torch

import seqwrap
from seqwrap.hf import is_minisequence_applied

from .mst_tiny import batch, grads, max_rel_error, pair, tiny_model


def _instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_unsupported_model_type_is_refused(family):
    import transformers as tf

    cfg = {"gpt2": tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32),
           "gpt_neox": tf.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)}[family]
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=f"model type '{family}'"):
        seqwrap.apply_minisequence(model)
    assert not any(f is not None for f in _instance_forwards(model).values())


def test_bad_arguments():
    model = tiny_model("llama")
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="mlp_chunks"):
            seqwrap.apply_minisequence(model, mlp_chunks=bad)
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="mlp_memory"):
            seqwrap.apply_minisequence(model, mlp_memory=bad)
    with pytest.raises(ValueError, match="not both"):
        seqwrap.apply_minisequence(model, mlp_chunks=2, mlp_memory=2**20)
    with pytest.raises(TypeError, match="LlamaModel"):
        seqwrap.apply_minisequence(model.model)  # the bare decoder: no lm_head


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_inference_unchanged(family):
    ref, twin = pair(family)
    seqwrap.apply_minisequence(twin, mlp_chunks=3)
    ids = batch(12)["input_ids"]
    ref.eval(), twin.eval()
    with torch.no_grad():  # inference: the original forwards, bit for bit
        assert torch.equal(ref(ids).logits, twin(ids).logits)
        assert torch.equal(ref(ids, logits_to_keep=1).logits, twin(ids, logits_to_keep=1).logits)
        gen_ref = ref.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        gen_twin = twin.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_ref, gen_twin)
    # no labels but grad enabled: logits still returned; MLPs run in mini-sequences (same values)
    torch.testing.assert_close(twin(ids).logits, ref(ids).logits, rtol=1e-12, atol=1e-12)


def test_remove_restores_exactly():
    model = tiny_model("qwen2")
    before = _instance_forwards(model)
    seqwrap.apply_minisequence(model, mlp_chunks=2)
    assert is_minisequence_applied(model)
    patched = _instance_forwards(model)
    assert patched["model.layers.0.mlp"] is not None and patched[""] is not None
    seqwrap.apply_minisequence(model, mlp_chunks=3, loss=False)  # re-apply: replaces the settings
    assert _instance_forwards(model)[""] is None
    seqwrap.remove_minisequence(model)
    assert _instance_forwards(model) == before
    assert not is_minisequence_applied(model)
    assert not any(hasattr(m, "_seqwrap_mst") for m in model.modules())
    assert type(model).forward is model.forward.__func__
    seqwrap.remove_minisequence(model)  # removing twice is harmless


def test_remove_keeps_an_instance_forward_set_by_someone_else():
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    custom = mlp.forward  # e.g. what accelerate's hooks do: an instance-level forward
    mlp.forward = custom
    seqwrap.apply_minisequence(model)
    assert mlp.forward is not custom
    seqwrap.remove_minisequence(model)
    assert mlp.__dict__["forward"] is custom


def test_return_dict_false_and_loss_only():
    ref, twin = pair("mistral")
    seqwrap.apply_minisequence(twin, mlp_chunks=2)
    inputs = batch(9)
    out = twin(**inputs, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    torch.testing.assert_close(out[0], ref(**inputs).loss, rtol=1e-12, atol=0)
    # loss=False: only the MLPs; logits come back, loss is transformers' own
    seqwrap.apply_minisequence(twin, mlp_chunks=2, loss=False)
    out = twin(**inputs)
    assert out.logits.shape == (2, 9, 128)


def test_lora_on_lm_head_falls_back_to_full_logits():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    ref = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "gate_proj"], init_lora_weights=False))
    ref.to(torch.float64)
    twin = copy.deepcopy(ref)
    seqwrap.apply_minisequence(twin, mlp_chunks=2)
    inputs = batch(8)
    with pytest.warns(UserWarning, match="lm_head"):
        got = twin(**inputs)
    assert got.logits is not None  # the original forward ran
    torch.testing.assert_close(got.loss, ref(**inputs).loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("gc", [False, True], ids=["no-gc", "gc"])
def test_gradient_hooks_fire_once_per_parameter(lora, gc):
    """What DDP / FSDP rely on: one gradient delivery per parameter per backward."""
    model = tiny_model("llama", lora=lora)
    if gc:
        seqwrap.hf.enable_checkpointing(model, use_reentrant=None)
    seqwrap.apply_minisequence(model, mlp_chunks=3)
    counts = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[name] = [0, 0]
            p.register_post_accumulate_grad_hook(lambda _p, n=name: counts[n].__setitem__(0, counts[n][0] + 1))
            p.register_hook(lambda g, n=name: counts[n].__setitem__(1, counts[n][1] + 1))
    model.train()
    model(**batch(10)).loss.backward()
    assert counts and all(c == [1, 1] for c in counts.values()), counts


def test_ddp_single_process(tmp_path):
    """A real DistributedDataParallel (gloo, world size 1) accepts the patched model."""
    import torch.distributed as dist

    ref, twin = pair("llama")
    seqwrap.apply_minisequence(twin, mlp_chunks=3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(twin)
        assert is_minisequence_applied(ddp)
        inputs = batch(11)
        ref(**inputs).loss.backward()
        for _ in range(2):  # a second step: DDP's reducer must be ready again
            twin.zero_grad()
            ddp(**inputs).loss.backward()
        assert max_rel_error(grads(ref), grads(twin)) < 1e-10
    finally:
        dist.destroy_process_group()


def test_peft_wrapper_is_unwrapped_and_trainer_step_runs(tmp_path):
    """HF Trainer on a patched PeftModel: outputs.loss drives training, logits are None."""
    from transformers import Trainer, TrainingArguments

    ref, twin = pair("qwen3", lora=True)
    seqwrap.apply_minisequence(twin, mlp_chunks=2)
    assert is_minisequence_applied(twin) and is_minisequence_applied(twin.get_base_model())
    data = [{k: v[i] for k, v in batch(10).items()} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                             learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(model=twin, args=args, train_dataset=data).train()
    inputs = batch(10)
    want = ref(**inputs).loss.item()
    assert abs(result.training_loss - want) < 1e-6 * abs(want)
