"""The SeCO memory model: its terms follow the model's shapes, offload removes every O(T) device term."""
import pytest

from seqwrap.memory_model import DecoderShape, longest_sequence, seco_peak


def test_param_count_from_config_matches_the_model():
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert DecoderShape.from_config(cfg).params == n


def test_llama_8b_per_token_terms():
    s = DecoderShape.llama_3_1_8b()
    C = 4096
    est = seco_peak(s, 5 * C, C, dtype_bytes=2, lora_params=s.lora_params(16))
    # 32 layers x (K and V) x 8 heads x 128 x 2 bytes = 128 KiB per past token
    assert est.device["past K/V"] == 4 * C * 128 * 1024
    # float32 sums and their Kahan compensation: 4x the bf16 K/V
    assert est.device["relayed K/V gradient sums"] == 4 * est.device["past K/V"]
    assert s.lora_params(16) == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)


def test_offload_keeps_the_device_flat_and_moves_the_sequence_to_the_host():
    s = DecoderShape.llama_3_1_8b()
    kw = dict(dtype_bytes=2, lora_params=s.lora_params(16), grad_ckpt=True, offload=True)
    short, long = (seco_peak(s, n, 8192, **kw) for n in (1 << 16, 1 << 20))
    grow_dev = long.device_total - short.device_total
    assert grow_dev == ((1 << 20) - (1 << 16)) * 24  # only token ids / labels / mask grow on the device
    assert long.host_total > 10 * short.host_total
    no = seco_peak(s, 1 << 20, 8192, dtype_bytes=2, lora_params=s.lora_params(16), grad_ckpt=True)
    assert no.host_total == 0 and no.device_total > long.device_total + long.host_total * 0.9


def test_longest_sequence_is_the_boundary():
    s = DecoderShape.llama_3_1_8b()
    kw = dict(dtype_bytes=2, lora_params=s.lora_params(16), grad_ckpt=True)
    budget, chunk = 74e9, 8192
    n = longest_sequence(s, budget, None, chunk, **kw)
    assert n > 0 and n % chunk == 0
    assert seco_peak(s, n, chunk, **kw).device_total <= budget < seco_peak(s, n + chunk, chunk, **kw).device_total
    with_host = longest_sequence(s, budget, 1e12, chunk, offload=True, **kw)
    assert with_host > 10 * n
    assert longest_sequence(s, 1e9, None, chunk, **kw) == 0  # the weights alone do not fit


def test_concat_adds_an_o_t_copy():
    s = DecoderShape.llama_3_1_8b()
    a = seco_peak(s, 1 << 16, 4096, attention="concat")
    b = seco_peak(s, 1 << 16, 4096)
    assert a.device_total - b.device_total == 2 * 32 * (1 << 16) * 8 * 128 * 2 + 32 * 4096 * (1 << 16) * 2
