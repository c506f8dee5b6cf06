"""One test per item of seqwrap/hf/compat.py: what seqwrap relies on in the installed transformers.

When a transformers release changes one of these, the test named after it fails (and says what
changed), instead of dozens of engine tests failing for no visible reason.
"""
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqwrap.hf import compat  # noqa: E402
from tests.hf_tiny import tiny_model  # noqa: E402


def _llama(layers=2, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg)


def test_cache_argument():
    """The decoder and the causal LM take the cache under one keyword, and a cache passed under it is
    the one the attention layers update, without a deprecation warning."""
    from transformers.cache_utils import DynamicCache

    model = _llama()
    name = compat.cache_argument(type(model.model))
    assert name in ("cache", "past_key_values")
    assert name in inspect.signature(type(model).forward).parameters
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.model(input_ids=torch.randint(0, 61, (1, 5)), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 5


def test_output_cache_field():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    field = compat.output_cache_field()
    out = _llama().model(input_ids=torch.randint(0, 61, (1, 4)), use_cache=True)
    assert isinstance(out, BaseModelOutputWithPast)
    assert getattr(out, field) is not None
    built = compat.causal_lm_output(field, loss=None, logits=None, cache="x")
    assert getattr(built, field) == "x"


@pytest.mark.parametrize("family, want_kinds, want_window", [
    ("llama", ["full_attention"] * 2, None),
    ("mistral", ["sliding_attention"] * 2, 7),
    ("gemma2", ["sliding_attention", "full_attention"], 6),
])
def test_layer_kinds(family, want_kinds, want_window):
    model = tiny_model(family)
    kinds, kwargs = compat.layer_types_and_kwargs(model.config)
    assert len(kinds) == len(kwargs) == model.config.num_hidden_layers
    assert all(isinstance(kw, dict) for kw in kwargs)
    assert compat.layer_kinds(model.config, family, "SeCO") == (want_kinds, want_window)


def test_unknown_layer_kind_is_refused_by_name():
    model = _llama()
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(compat.UnsupportedModelError, match="linear_attention"):
        compat.layer_kinds(model.config, "llama", "SeCO")


def test_cache_contract():
    """Our Cache view: HF builds it from layers, calls update once per layer after RoPE with (B, Hkv, L, D)
    K/V, and asks only the methods the view answers (no base-class method that would read the
    placeholder layers)."""
    from transformers.cache_utils import Cache

    from seqwrap.engines.kv_store import ChunkKVStore
    from seqwrap.hf.cache import ChunkCache

    model = _llama()
    store = ChunkKVStore([(0, 5)], [False, False], None)
    store.begin(0, "record", store=True)
    called = []
    answered = {"update", "get_seq_length", "get_query_offset", "get_mask_sizes", "get_max_length"}
    originals = {}
    for name, fn in vars(Cache).items():
        if callable(fn) and not name.startswith("__") and name not in answered:
            originals[name] = fn

            def spy(self, *a, _name=name, **k):
                called.append(_name)
                return originals[_name](self, *a, **k)
            setattr(ChunkCache, name, spy)
    try:
        cache = ChunkCache(store)
        name = compat.cache_argument(type(model.model))
        model.model(input_ids=torch.randint(0, 61, (2, 5)), use_cache=True, **{name: cache})
    finally:
        for name in originals:
            delattr(ChunkCache, name)
    assert sorted(store.updated) == [0, 1], "update is called once per layer"
    assert store.keys[0][0].shape == (2, 2, 5, 8), "K arrives as (B, Hkv, L, D)"
    assert not [c for c in called if c not in ("is_sliding", "is_compileable", "is_initialized", "__len__")], called


def test_attention_registry():
    """A registered function, selected with set_attn_implementation, is called with (module, q, k, v,
    mask, dropout=, scaling=, ...) for every layer; keywords given to the decoder reach it; the mask
    function registered beside it decides the mask (None here)."""
    from seqwrap.hf import attention

    seen = []

    def spy(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append((module.layer_idx, tuple(query.shape), tuple(key.shape), attention_mask, scaling,
                     kwargs.get("seqwrap_probe")))
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    attention.register("seqwrap_compat_probe", spy)
    model = _llama()
    before = model.config._attn_implementation
    with attention.implementation(model, "seqwrap_compat_probe"):
        model.model(input_ids=torch.randint(0, 61, (1, 5)), seqwrap_probe="here")
    assert model.config._attn_implementation == before
    assert [s[0] for s in seen] == [0, 1]
    assert all(s[1] == (1, 4, 5, 8) and s[2] == (1, 2, 5, 8) for s in seen)
    assert all(s[3] is None and s[4] == pytest.approx(8 ** -0.5) and s[5] == "here" for s in seen)


def test_checkpoint_with_cache():
    """GradientCheckpointingLayer drops the cache of a checkpointed layer unless the instance says
    _can_checkpoint_with_cache; _gradient_checkpointing_func is a partial with use_reentrant."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert GradientCheckpointingLayer._can_checkpoint_with_cache is False
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[0]
    assert isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False
    from seqwrap.engines.kv_store import ChunkKVStore
    from seqwrap.hf.cache import ChunkCache
    from seqwrap.hf.checkpointing import CheckpointWithCache

    model.train()
    store = ChunkKVStore([(0, 5)], [False, False], None)
    store.begin(0, "record")
    with CheckpointWithCache(model.model.layers, "SeCO"):
        model.model(input_ids=torch.randint(0, 61, (1, 5)),
                    **{compat.cache_argument(type(model.model)): ChunkCache(store)})
    assert sorted(store.updated) == [0, 1], "checkpointed layers kept the cache"
    assert "_can_checkpoint_with_cache" not in layer.__dict__


def test_causal_lm_loss():
    from seqwrap.hf.minisequence import FAMILIES

    loss_fn = compat.causal_lm_loss_function()
    params = inspect.signature(loss_fn).parameters
    for name in ("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels"):
        assert name in params, name
    for family in FAMILIES:
        assert tiny_model(family).loss_function is loss_fn, family


def test_logits_to_keep():
    hidden = torch.arange(24.0).reshape(1, 6, 4)
    assert torch.equal(compat.slice_to_keep(hidden, 0), hidden)
    assert torch.equal(compat.slice_to_keep(hidden, 2), hidden[:, -2:])
    idx = torch.tensor([0, 3])
    assert torch.equal(compat.slice_to_keep(hidden, idx), hidden[:, idx])
    assert "logits_to_keep" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters


def test_mamba_internals():
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=61, hidden_size=16, state_size=4, num_hidden_layers=1, conv_kernel=3, expand=2))
    bb = model.backbone
    for name in ("embeddings", "layers", "norm_f"):
        assert hasattr(bb, name), name
    block = bb.layers[0]
    for name in ("norm", "mixer", "residual_in_fp32"):
        assert hasattr(block, name), name
    m = block.mixer
    for name in ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "act", "time_step_rank",
                 "ssm_state_size", "intermediate_size", "use_conv_bias"):
        assert hasattr(m, name), name


def test_trainer_internals():
    from transformers import Trainer, TrainingArguments

    params = list(inspect.signature(Trainer.training_step).parameters)
    assert params[:4] == ["self", "model", "inputs", "num_items_in_batch"]
    # SeqwrapTrainer's evaluation: prediction_step(model, inputs, prediction_loss_only, ignore_keys) -> 3-tuple
    params = list(inspect.signature(Trainer.prediction_step).parameters)
    assert params[:5] == ["self", "model", "inputs", "prediction_loss_only", "ignore_keys"]
    for name in ("_prepare_inputs", "compute_loss_context_manager"):
        assert callable(getattr(Trainer, name, None)), name
    # set by the training loop for each optimizer step; SeqwrapTrainer divides by it without num_items_in_batch
    assert "self.current_gradient_accumulation_steps =" in inspect.getsource(Trainer)
    assert hasattr(TrainingArguments, "average_tokens_across_devices")


def test_packed_rows_need_no_cache_and_no_mask():
    """hf/packing.py: HF's sdpa / eager attention keeps documents apart when position_ids restart, the call
    has no attention mask and no cache (use_cache=False); with its default cache it does not."""
    from .hf_tiny import tiny_model

    model = tiny_model("llama", layers=1)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 61, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    alone = torch.cat([model(ids[:, s:e]).logits for s, e in ((0, 4), (4, 6), (6, 9))], 1)
    assert (model(ids, position_ids=pos, use_cache=False).logits - alone).abs().max() < 1e-12
    assert (model(ids, position_ids=pos).logits - alone).abs().max() > 1e-3


# -- items of issue 19 (exact by construction) ---------------------------------------------------------
def test_rotary_modules():
    """HF's rotary modules are named *RotaryEmbedding, take (x, position_ids) and return per-position
    (cos, sin) of shape (B, L, d); LongRoPE's choice depends on the call's largest position."""
    from seqwrap.hf.positions import has_dynamic_rope, rotary_modules

    model = _llama(rope_scaling=dict(  # max_position_embeddings 64
        rope_type="longrope", original_max_position_embeddings=16, short_factor=[1.0] * 4, long_factor=[3.0] * 4))
    (rotary,) = rotary_modules(model)
    assert has_dynamic_rope(model) and not has_dynamic_rope(_llama())
    x = torch.zeros(1, 8, 32)
    cos, sin = rotary(x, torch.arange(8)[None])
    assert cos.shape == sin.shape == (1, 8, 8)
    long_cos, _ = rotary(x, torch.arange(32)[None])
    assert not torch.allclose(long_cos[:, :8], cos), "the long factors apply past original_max_position_embeddings"


def test_attention_modules_have_layer_idx():
    """bound_store reaches the attention through the module HF hands the attention function."""
    from seqwrap.hf import attention

    model = _llama()
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(getattr(module, attention.STORE_ATTR, None))
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    attention.register("seqwrap_test_spy", spy)
    marker = object()
    with attention.implementation(model, "seqwrap_test_spy"), attention.bound_store(model, marker):
        model(torch.randint(0, 61, (1, 4)))
    assert seen == [marker, marker]
    assert all(attention.STORE_ATTR not in m.__dict__ for m in model.modules()), "the binding is removed"


def test_router_aux_loss_contract():
    """The MoE causal LM returns aux_loss, adds `self.router_aux_loss_coef * aux_loss`, and its decoder gives
    router_logits as (B*L, experts) per MoE layer."""
    from seqwrap.hf.router_aux import aux_coefficient, wants_router_logits

    cfg = transformers.MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3)
    model = transformers.MixtralForCausalLM(cfg)
    assert wants_router_logits(model) and aux_coefficient(model, "test") == 0.3
    ids = torch.randint(0, 61, (2, 5))
    out = model.model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (10, 4)
    full = model(ids, labels=ids)
    assert torch.is_tensor(full.aux_loss)
    cfg.output_router_logits = False
    plain = model(ids, labels=ids)
    torch.testing.assert_close(full.loss, plain.loss + 0.3 * full.aux_loss)


def test_lm_head_modules():
    """ModernBERT-decoder applies lm_head (dense, act, norm) before its projection `decoder`; BERT's projection
    sits in `cls` after its transform; a Llama has nothing but the projection."""
    from seqwrap.hf.head import resolve_head

    llama = _llama()
    assert resolve_head(llama, llama.model, llama.get_output_embeddings(), "test") == ([], llama.lm_head)
    try:
        cfg = transformers.ModernBertDecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=4, pad_token_id=0)
    except Exception as exc:  # 5.15.1 validates its own default rope_parameters and refuses them
        if type(exc).__name__ != "StrictDataclassFieldValidationError":
            raise
        pytest.skip(f"transformers {transformers.__version__} cannot build ModernBertDecoderConfig: {str(exc)[:120]}")
    model = transformers.ModernBertDecoderForCausalLM(cfg)
    assert resolve_head(model, model.model, model.get_output_embeddings(), "test") == ([model.lm_head], model.decoder)
    bert = transformers.BertLMHeadModel(transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=4, intermediate_size=48,
                                                               is_decoder=True))
    assert resolve_head(bert, bert.bert, bert.get_output_embeddings(), "test") == ([], bert.cls)


def test_kv_sharing_layer_kind():
    """Gemma3n says it shares K/V through config.num_kv_shared_layers (what compat.layer_kinds refuses by); 5.2x
    also turns those layers' kind into 'dummy'."""
    cfg = transformers.Gemma3nTextConfig(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, num_kv_shared_layers=1,
                                         intermediate_size=[48] * 3, activation_sparsity_pattern=[0.0] * 3,
                                         layer_types=["sliding_attention", "full_attention", "full_attention"],
                                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=61, laurel_rank=4,
                                         altup_num_inputs=2, sliding_window=8)
    assert cfg.num_kv_shared_layers == 1
    with pytest.raises(compat.UnsupportedModelError, match="num_kv_shared_layers=1"):
        compat.layer_kinds(cfg, "gemma3n_text", "test")


def _dpo_trainer():
    trl = pytest.importorskip("trl")
    return trl.DPOTrainer


def test_trl_dpo_loss_contract():
    """SeqwrapDPOTrainer runs DPOTrainer._compute_loss on a stand-in model whose per-token log-probs carry the sums:
    it must call the model with fused_lm_head=True, sum .log_probs per row, and take the reference sums from the
    batch when precompute_ref_logps is set."""
    DPOTrainer = _dpo_trainer()
    assert list(inspect.signature(DPOTrainer._compute_loss).parameters) == ["self", "model", "inputs",
                                                                              "return_outputs"]
    src = inspect.getsource(DPOTrainer._compute_loss)
    for needle in ("outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)",
                   "per_token_logps = outputs.log_probs[:, -seq_len:]", "logps = per_token_logps.sum(dim=1)",
                   "if self.precompute_ref_logps:",
                   'ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]',
                   "outputs.entropy", "outputs.mean_logits", "outputs.is_top1", "self._metrics[mode]",
                   "self._total_train_tokens +="):
        assert needle in src, needle


def test_trl_dpo_reference_contract():
    DPOTrainer = _dpo_trainer()
    from trl.trainer.utils import use_adapter

    assert list(inspect.signature(DPOTrainer.compute_ref_log_probs).parameters) == ["self", "model", "inputs"]
    assert "self.compute_ref_log_probs(model, padded_batch)" in inspect.getsource(DPOTrainer._precompute_ref_logps)
    assert list(inspect.signature(use_adapter).parameters) == ["model", "adapter_name"]
    src = inspect.getsource(DPOTrainer._compute_loss)
    assert 'adapter_name="ref" if "ref" in ref_model_unwrapped.peft_config else None' in src


def test_trl_dpo_batch_and_scale():
    DPOTrainer = _dpo_trainer()
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    example = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}
    batch = DataCollatorForPreference(pad_token_id=0)([example])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 8, 9]]  # [chosen ; rejected]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert DPOTrainer.loss_is_scaled_for_ga is False
    init = inspect.getsource(DPOTrainer.__init__)
    for needle in ("self.precompute_ref_logps =", "self.aux_loss_enabled =", "self._is_vision_dataset =",
                   "self.ref_model =", "self.use_weighting =", "self.ld_alpha =", "self.f_divergence_type ="):
        assert needle in init, needle
