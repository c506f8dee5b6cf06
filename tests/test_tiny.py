"""The tiny-twin config shrinker (seqwrap/hf/tiny.py): small sizes, the architecture kept."""
import pytest

transformers = pytest.importorskip("transformers")

from seqwrap.hf.tiny import HIDDEN, VOCAB, build_twin, shrink_config, special_token_ids  # noqa: E402

SEQ = 40


def test_sizes_shrink_and_never_grow():
    big = transformers.LlamaConfig()
    tiny = shrink_config(big, seq_len=SEQ)
    assert type(tiny) is transformers.LlamaConfig
    assert (tiny.hidden_size, tiny.num_attention_heads, tiny.vocab_size) == (HIDDEN, 4, VOCAB)
    assert tiny.num_hidden_layers == 2 and tiny.max_position_embeddings >= SEQ
    small = transformers.LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=24, vocab_size=50)
    again = shrink_config(small, seq_len=SEQ)
    assert (again.hidden_size, again.num_attention_heads, again.intermediate_size, again.vocab_size) == (16, 2, 24, 50)


def test_grouped_query_attention_stays_grouped_and_mha_stays_mha():
    gqa = shrink_config(transformers.MistralConfig())  # 32 heads, 8 KV heads
    assert gqa.num_key_value_heads == 2 and gqa.num_attention_heads == 4
    mha = shrink_config(transformers.LlamaConfig(num_key_value_heads=32))
    assert mha.num_key_value_heads == mha.num_attention_heads


def test_layer_pattern_survives():
    g3 = shrink_config(transformers.Gemma3TextConfig())  # 5 sliding : 1 full
    assert set(g3.layer_types) == {"sliding_attention", "full_attention"}
    assert g3.num_hidden_layers == len(g3.layer_types) <= 6
    assert g3.sliding_window < SEQ
    ds = shrink_config(transformers.DeepseekV3Config())  # 3 dense layers, then MoE
    assert ds.num_hidden_layers == 2 and ds.first_k_dense_replace == 1
    assert ds.n_routed_experts == 4 and ds.num_experts_per_tok == 2
    assert ds.v_head_dim != ds.qk_nope_head_dim + ds.qk_rope_head_dim  # MLA: value head != query/key head


def test_longrope_switch_is_crossed_by_the_twin_and_factors_fit_the_rotary_size():
    rope = dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=4096,
                short_factor=[1.0] * 48, long_factor=[2.0 + i for i in range(48)])
    big = transformers.Phi3Config(rope_parameters=rope, max_position_embeddings=131072,
                                  original_max_position_embeddings=4096)
    tiny = shrink_config(big, seq_len=SEQ)
    params = tiny.rope_parameters
    half = tiny.hidden_size // tiny.num_attention_heads // 2
    assert len(params["short_factor"]) == len(params["long_factor"]) == half
    assert params["long_factor"][0] == 2.0 and params["long_factor"][-1] == 49.0  # resampled, ends kept
    # a first chunk of verify's default size (12) stays below the switch, the whole sequence crosses it
    assert 12 < params["original_max_position_embeddings"] < SEQ
    assert tiny.original_max_position_embeddings == params["original_max_position_embeddings"]


def test_special_ids_fit_the_vocabulary_and_the_twin_is_float64_random_and_dropout_free():
    tiny = shrink_config(transformers.GPT2Config(resid_pdrop=0.3, embd_pdrop=0.3))  # bos/eos 50256
    assert all(0 <= i < tiny.vocab_size for i in special_token_ids(tiny))
    assert tiny.resid_pdrop == 0.0 and tiny.embd_pdrop == 0.0
    twin = build_twin(tiny, transformers.GPT2LMHeadModel)
    assert twin.training
    assert all(p.dtype.is_floating_point and p.dtype == __import__("torch").float64 for p in twin.parameters())
    ln = twin.transformer.h[0].ln_1
    assert not (ln.weight == 1).all() and not (ln.bias == 0).all()  # constant inits randomised
