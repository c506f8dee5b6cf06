"""Issue 19: families whose chunked step used to be silently wrong or to fail mid-step, each checked in
float64 against full backprop of the same model (or refused before any gradient), and the run-time
invariants the engines now check."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import transformers

import seqwrap
from seqwrap.hf import UnsupportedModelError
from seqwrap.hf.positions import rotary_modules
from seqwrap.hf.versions import parse_version

from .exact_families import batch, build, compare, engine_step, reference

TOL = 1e-10


def assert_exact(model, ids, mask=None, **options):
    dloss, worst, where = compare(model, ids, mask, **options)
    assert dloss < 1e-10 and worst < TOL, f"loss off by {dloss:.2e}, gradient of {where} off by {worst:.2e}"


def assert_refused_before_gradients(model, ids, match, mask=None, **options):
    model.zero_grad(set_to_none=True)
    with pytest.raises(UnsupportedModelError, match=match):
        engine_step(model, ids, mask, **options)
    assert all(p.grad is None for p in model.parameters()), "a refusal must come before any gradient"


# -- 1. positional state chosen per call ---------------------------------------------------------------
LONGROPE = dict(max_position_embeddings=64, original_max_position_embeddings=16,
                rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(4)],
                                  long_factor=[2.0 + 0.3 * i for i in range(4)]))


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_longrope_chunks_get_the_whole_sequences_factors(family):
    model = build(family, **LONGROPE)
    ids, mask = batch(T=24, pad=3)  # 24 > original_max_position_embeddings=16 > every chunk's own length
    rotary = rotary_modules(model)[0]
    x = torch.zeros(1, 7, 8, dtype=torch.float64)
    first_chunk = rotary(x, torch.arange(7)[None])[0]
    whole = rotary(x, torch.arange(24)[None])[0][:, :7]
    assert not torch.allclose(first_chunk, whole), "the test must exercise LongRoPE's long/short switch"
    for chunk in (7, 8):
        assert_exact(model, ids, mask, chunk_size=chunk)


def test_dynamic_ntk_beyond_max_position_embeddings():
    model = build("llama", max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    ids, _ = batch(T=30)
    assert_exact(model, ids, chunk_size=8)


def test_positions_that_are_not_the_slice_are_refused(monkeypatch):
    """A decoder that gives a chunk other positions than its slice of the whole sequence is refused."""
    model = build("llama")
    ids, _ = batch(T=16)
    decoder_forward = model.model.forward

    def shifted_positions(*args, position_ids=None, **kwargs):  # restarts positions in every chunk
        return decoder_forward(*args, position_ids=torch.arange(args[0].shape[1] if args else
                                                                kwargs["input_ids"].shape[1])[None], **kwargs)

    monkeypatch.setattr(model.model, "forward", shifted_positions)
    assert_refused_before_gradients(model, ids, "not the slice", chunk_size=8)


# -- 2. MoE router auxiliary losses -----------------------------------------------------------------
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, router_aux_loss_coef=0.5),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, aux_loss_coef=0.5, kv_channels=8),
}


@pytest.mark.parametrize("family", sorted(MOE))
def test_router_aux_loss_is_part_of_the_chunked_objective(family):
    model = build(family, output_router_logits=True, experts_implementation="eager", **MOE[family])
    ids, mask = batch(T=21, pad=4)
    aux = model(ids, attention_mask=mask).aux_loss
    if aux is None:  # transformers 5.15's JetMoE reads output_router_logits from the keyword only: no aux term,
        assert_exact(model, ids, mask, chunk_size=5)  # and the engine must not add one either
        return
    assert 0.5 * aux.item() > 1e-3, "the auxiliary term must be large enough to notice"
    for chunk in (5, 7):
        assert_exact(model, ids, mask, chunk_size=chunk)


HYBRID_MOE = {
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4,
                  mamba_expand=2, mamba_d_conv=4),
    "granitemoehybrid": dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                             shared_intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                             mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
                             mamba_chunk_size=8, position_embedding_type="rope"),
}


@pytest.mark.parametrize("family", sorted(HYBRID_MOE))
def test_router_aux_loss_of_hybrid_models(family):
    """The same mechanism serves hybrid (recurrent + attention + MoE) models."""
    model = build(family, attn="eager", output_router_logits=True, router_aux_loss_coef=0.5,
                  experts_implementation="eager", **HYBRID_MOE[family])
    ids, mask = batch(T=20, pad=3)
    try:
        reference(model, ids, mask)
    except AttributeError as exc:  # 5.15's GraniteMoeHybrid decoder records no router logits: aux_loss is int 0
        pytest.skip(f"transformers {transformers.__version__}: HF's own forward fails with output_router_logits=True "
                    f"({exc})")
    assert_exact(model, ids, mask, chunk_size=7)


def test_router_aux_loss_under_spaco_rate_one():
    model = build("mixtral", output_router_logits=True, experts_implementation="eager", **MOE["mixtral"])
    ids, _ = batch(T=20)
    assert_exact(model, ids, engine=seqwrap.SpaCO, chunk_size=6, rate=1.0, seed=3)


def test_an_aux_loss_of_unknown_weight_is_refused(monkeypatch):
    model = build("mixtral", output_router_logits=True, experts_implementation="eager", **MOE["mixtral"])
    monkeypatch.setattr("seqwrap.hf.router_aux.COEFFICIENT_NAMES", ("some_other_coefficient",))
    with pytest.raises(UnsupportedModelError, match="output_router_logits=False"):
        seqwrap.SeCO(model, chunk_size=6)
    assert all(p.grad is None for p in model.parameters())


# -- 3. attention run twice per layer; attention outside the registry; masks built by the layer ----------
def test_diffllama_switches_to_concat_and_is_exact():
    model = build("diffllama")
    ids, mask = batch(T=20, pad=2)
    assert_refused_before_gradients(model, ids, "more than once per layer", mask, attention="chunked")
    with pytest.warns(UserWarning, match="uses attention='concat'"):
        assert_exact(model, ids, mask, chunk_size=6)


@pytest.mark.parametrize("family,config", [("bloom", dict(n_layer=2, n_head=4, n_embd=32)),
                                            ("mpt", dict(n_layers=2, n_heads=4, d_model=32)),
                                            ("gpt_neox_japanese", {})])
def test_families_outside_the_registry_get_concat(family, config):
    model = build(family, attn="eager", **config)
    ids, mask = batch(T=18, pad=2)
    with pytest.warns(UserWarning, match="attention-function registry"):
        dloss, worst, where = compare(model, ids, mask, chunk_size=5)
    # bloom's eager attention computes its softmax in float32 (not neutralised: torch.baddbmm + .float())
    assert dloss < 1e-9 and worst < (1e-6 if family == "bloom" else TOL), (where, worst)


def test_doge_dynamic_mask_switches_to_concat():
    if parse_version(transformers.__version__) < (5, 24):
        model = build("doge")  # HF's Doge with sdpa is not causal before 5.24: refused up front
        with pytest.raises(UnsupportedModelError, match="not causal"):
            seqwrap.SeCO(model, chunk_size=5)
        model = build("doge", attn="eager")
    else:
        model = build("doge")
    ids, _ = batch(T=18)
    assert_refused_before_gradients(model, ids, "builds its own attention mask", attention="chunked")
    with pytest.warns(UserWarning, match="builds its own attention mask"):
        dloss, worst, where = compare(model, ids, chunk_size=5)
    assert dloss < 1e-10 and worst < 1e-12, (where, worst)


# -- 4. LM heads that are more than a Linear -------------------------------------------------------------
def test_modernbert_decoder_runs_its_whole_head():
    model = _modernbert_or_skip(global_attn_every_n_layers=1)
    ids, mask = batch(T=20, pad=3)
    assert_exact(model, ids, mask, chunk_size=6)


def _modernbert_or_skip(**config):
    try:
        return build("modernbert-decoder", **config)
    except Exception as exc:  # 5.15.1 validates its own default rope_parameters and refuses them
        if type(exc).__name__ != "StrictDataclassFieldValidationError":
            raise
        pytest.skip(f"transformers {transformers.__version__} cannot build ModernBertDecoderConfig: {str(exc)[:120]}")


def test_an_unknown_module_beside_the_head_is_refused():
    model = build("llama")
    model.extra_head = torch.nn.Linear(32, 32).double()  # used by a forward the engine cannot see into
    type_forward = type(model).forward

    def forward(self, *args, **kwargs):  # pragma: no cover - only its source is read
        self.extra_head
        return type_forward(self, *args, **kwargs)

    cls = type("LlamaWithExtraHead", (type(model),), {"forward": forward})
    model.__class__ = cls
    with pytest.raises(UnsupportedModelError, match="extra_head"):
        seqwrap.SeCO(model, chunk_size=6)


# -- 5. two threads, two engines, dropout --------------------------------------------------------------
def test_two_threads_replay_their_own_dropout_masks():
    """Each thread steps its own LoRA model (dropout 0.5) with SeCO; every chunk's replay in pass 2 must draw
    the dropout masks of its pass-1 forward, although both threads share torch's generator."""
    peft = pytest.importorskip("peft")
    records = {}

    def make(seed):
        model = build("llama", seed=seed)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                           target_modules=["q_proj", "v_proj"]))
        model.train()
        drops = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
        calls = records.setdefault(seed, [])
        for d in drops:
            d.register_forward_hook(lambda mod, inp, out, calls=calls: calls.append((out == 0).clone()))
        return model, len(drops)

    models = {seed: make(seed) for seed in (0, 1)}
    ids, _ = batch(T=28)
    chunks = 4
    errors = []

    def train(seed):
        model, _ = models[seed]
        engine = seqwrap.SeCO(model, chunk_size=7)
        try:
            for _ in range(6):
                engine(ids, labels=ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed, (_, per_chunk) in models.items():
        calls = records[seed]
        per_step = per_chunk * (2 * chunks - 1)  # pass 1: chunks 0..2; pass 2: chunks 3..0
        assert len(calls) == 6 * per_step
        for step in range(6):
            got = calls[step * per_step:(step + 1) * per_step]
            first = [got[c * per_chunk:(c + 1) * per_chunk] for c in range(chunks - 1)]
            replay = got[(chunks - 1) * per_chunk:]
            replayed = {chunks - 1 - j: replay[j * per_chunk:(j + 1) * per_chunk] for j in range(chunks)}
            for c in range(chunks - 1):
                assert all(torch.equal(a, b) for a, b in zip(first[c], replayed[c])), \
                    f"model {seed}, step {step}: chunk {c} replayed other dropout masks than its forward drew"


# -- 6. decoder layers that drop keyword arguments -----------------------------------------------------------
@pytest.mark.parametrize("family", ["stablelm", "nemotron"])
def test_layers_that_do_not_forward_kwargs(family):
    model = build(family)
    ids, mask = batch(T=20, pad=3)
    assert_exact(model, ids, mask, chunk_size=6)


# -- 8. HF Mamba with a padding mask ---------------------------------------------------------------------
def test_mamba_with_padding():
    model = build("mamba", attn="eager", state_size=8, expand=2, conv_kernel=4, time_step_rank=4)
    ids, mask = batch(T=24, pad=5)
    for chunk in (7, 12):
        assert_exact(model, ids, mask, chunk_size=chunk)


# -- 10. refusals that name the real cause -----------------------------------------------------------------
def test_llama4_text_is_refused_for_its_chunked_local_attention():
    model = build("llama4_text", num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=48,
                  experts_implementation="eager")
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        seqwrap.SeCO(model, chunk_size=6)


def test_gemma3n_kv_sharing_is_named():
    config = dict(num_hidden_layers=3, hidden_size_per_layer_input=8, vocab_size_per_layer_input=61, laurel_rank=4,
                  altup_num_inputs=2, intermediate_size=[48] * 3, activation_sparsity_pattern=[0.0] * 3,
                  layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=8)
    with pytest.raises(UnsupportedModelError, match="num_kv_shared_layers=1.*KV sharing"):
        seqwrap.SeCO(build("gemma3n_text", num_kv_shared_layers=1, **config), chunk_size=6)
    model = build("gemma3n_text", num_kv_shared_layers=0, **config)
    ids, _ = batch(T=18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no switch needed: plain chunked attention
        assert_exact(model, ids, chunk_size=6)
