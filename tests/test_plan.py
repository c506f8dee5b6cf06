"""seqwrap.plan: the choice fits its budget, more memory never shortens the longest sequence, bad inputs are
refused by name, chunk_size="auto" trains exactly as the chunk it picked; the CLI prints the table."""
import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

import seqwrap
from seqwrap.memory_model import DecoderShape, seco_peak
from seqwrap.planning import PlanError, parse_bytes, parse_tokens
from seqwrap.planning.known import KNOWN_CONFIGS

L8B = "llama-3.1-8b"


def test_units():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1TB") == 10**12 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(4096) == 4096
    assert parse_tokens("128K") == 131072 and parse_tokens("1M") == 1 << 20 and parse_tokens("4096") == 4096
    for bad, pattern in [("80G", "write GB for 10"), ("-3GB", "must be > 0"), ("lots", "not a number"),
                         ("0GB", "must be > 0"), ("12XB", "unknown unit 'XB'")]:
        with pytest.raises(ValueError, match=pattern):
            parse_bytes(bad, "device_memory")
    for bad in ("1.5", "0", "3Q", "-1K"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    with pytest.raises(TypeError):
        parse_bytes(True)


def test_embedded_llama_config_is_the_published_one():
    s = DecoderShape.from_config(type("C", (), KNOWN_CONFIGS[L8B]))
    assert s == DecoderShape.llama_3_1_8b()


@pytest.mark.parametrize("memory", ["24GB", "80GB", "141GB"])
@pytest.mark.parametrize("tokens", ["128K", "512K", "1M"])
def test_plan_fits_its_budget(memory, tokens):
    p = seqwrap.plan(L8B, tokens, device_memory=memory, host_memory="1TB", lora=16)
    assert p.device_peak <= p.device_budget < parse_bytes(memory)
    assert p.host_peak <= parse_bytes("1TB")
    assert p.longest_seq >= p.longest_seq_as_planned >= p.seq_len
    # the prediction is memory_model.seco_peak of the chosen setting, and its breakdown sums to it
    est = seco_peak(DecoderShape.llama_3_1_8b(), p.seq_len, p.chunk_size, dtype_bytes=2,
                    lora_params=DecoderShape.llama_3_1_8b().lora_params(16), grad_ckpt=p.checkpointing,
                    offload=p.offload)
    assert (est.device_total, est.host_total) == (p.device_peak, p.host_peak)
    assert sum(p.device_breakdown.values()) == p.device_peak
    assert p.chunk_size & (p.chunk_size - 1) == 0 and 256 <= p.chunk_size <= 16384


def test_more_memory_never_shortens_the_longest_sequence():
    last = 0
    for gb in (20, 24, 40, 80, 141, 200):
        p = seqwrap.plan(L8B, 1024, device_memory=f"{gb}GB", lora=16)
        assert p.longest_seq >= last
        last = p.longest_seq
    assert last > 4 * seqwrap.plan(L8B, 1024, device_memory="24GB", lora=16).longest_seq
    # and more host memory lengthens what offload reaches
    a, b = (seqwrap.plan(L8B, "128K", device_memory="80GB", host_memory=h, lora=16).longest_seq
            for h in ("256GB", "1TB"))
    assert b > 3 * a


def test_fastest_setting_first():
    # plenty of memory: no offload, no checkpointing, the whole sequence one chunk
    p = seqwrap.plan(L8B, 8192, device_memory="141GB", host_memory="1TB", lora=16)
    assert (p.offload, p.checkpointing, p.chunk_size) == (False, False, 8192)
    # 1M tokens on 80 GB only fits with the sequence in host memory
    p = seqwrap.plan(L8B, "1M", device_memory="80GB", host_memory="1TB", lora=16)
    assert p.offload and p.host_peak > p.device_peak
    # fixed flags are kept
    q = seqwrap.plan(L8B, "1M", device_memory="80GB", host_memory="1TB", lora=16, checkpointing=True)
    assert q.checkpointing and q.offload and q.host_peak < p.host_peak


def test_nothing_fits_says_what_would():
    with pytest.raises(PlanError, match=r"it would need at least .* of device memory.*longest sequence that fits "
                                        r"this memory is [0-9,]+ tokens.*With offload \(pass host_memory=\)"):
        seqwrap.plan(L8B, "1M", device_memory="80GB", lora=16)
    with pytest.raises(PlanError, match="weights, gradients and optimizer state alone take"):
        seqwrap.plan(L8B, 8192, device_memory="8GB", lora=None)
    assert issubclass(PlanError, ValueError)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(device_memory="80G"), ValueError, "unknown unit 'G'"),
    (dict(device_memory=-1), ValueError, "device_memory must be > 0"),
    (dict(device_memory="80GB", world_size=0), ValueError, "world_size must be an int >= 1"),
    (dict(device_memory="80GB", world_size=3), ValueError, "not a multiple of world_size 3"),
    (dict(device_memory="80GB", shard=0), ValueError, "shard must be an int >= 1"),
    (dict(device_memory="80GB", world_size=2, attention="concat"), ValueError, "Ulysses .* needs attention='chunked'"),
    (dict(device_memory="80GB", dtype="int8"), ValueError, "unknown dtype 'int8'"),
    (dict(device_memory="80GB", lora=-4), ValueError, "lora rank must be > 0"),
    (dict(device_memory="80GB", lora={"r": 8, "target_modules": ["fc1"]}), ValueError, r"\['fc1'\] are not modelled"),
    (dict(device_memory="80GB", engine="Adam"), ValueError, "engine must be one of"),
    (dict(device_memory="80GB", offload="yes"), TypeError, "offload must be None"),
    (dict(device_memory="80GB", offload=True), ValueError, "offload=True needs a host budget"),
    (dict(device_memory="80GB", reserve="90GB"), ValueError, "leaves nothing"),
])
def test_bad_inputs_are_refused_by_name(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        seqwrap.plan(L8B, 4096, **{"lora": 16, **kwargs})


def test_bad_sources_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="not a known name"):
        seqwrap.plan("no-such-org/no-such-model-xyz", 4096, device_memory="80GB")
    with pytest.raises(ValueError, match=r"lacks the decoder fields \['intermediate_size'"):
        seqwrap.plan({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10},
                     4096, device_memory="80GB", dtype="bf16")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        seqwrap.plan(str(bad), 4096, device_memory="80GB")
    with pytest.raises(ValueError, match="declares no dtype"):
        seqwrap.plan({k: v for k, v in KNOWN_CONFIGS[L8B].items() if k != "torch_dtype"}, 4096, device_memory="80GB")
    with pytest.raises(TypeError, match="expected a Hugging Face model"):
        seqwrap.plan(3.5, 4096, device_memory="80GB")


def test_sources_agree(tmp_path):
    """A known name, a dict, a config.json (file and folder) and a PretrainedConfig give the same plan."""
    transformers = pytest.importorskip("transformers")
    cfg = KNOWN_CONFIGS[L8B]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(device_memory="80GB", host_memory="1TB", lora=16)
    plans = [seqwrap.plan(src, "256K", **kw) for src in (L8B, dict(cfg), str(tmp_path / "config.json"), tmp_path)]
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    plans.append(seqwrap.plan(hf, "256K", dtype="bf16", **kw))
    assert len({(p.chunk_size, p.offload, p.checkpointing, p.device_peak, p.host_peak) for p in plans}) == 1


def test_ulysses_ranks_and_lora_configs():
    from seqwrap.planning.distributed import Layout, parallel_peak

    s = DecoderShape.llama_3_1_8b()
    p = seqwrap.plan(L8B, "256K", device_memory="80GB", host_memory="1TB", lora=16, world_size=4)
    assert p.chunk_size % 4 == 0 and p.longest_seq % 4 == 0
    kw = dict(dtype_bytes=2, lora_params=s.lora_params(16), grad_ckpt=p.checkpointing)
    est = parallel_peak(s, p.seq_len, p.chunk_size, Layout(sp=4, offload=p.offload), **kw)
    assert (est.device_total, est.host_total) == (p.device_peak, p.host_peak)  # the P-rank model
    # = one rank's share of the sequence (seco_peak at T/4, C/4) + one attention call's all-to-all buffers
    one_rank = seco_peak(s, p.seq_len // 4, p.chunk_size // 4, offload=p.offload, **kw)
    a2a = 2 * (p.chunk_size // 4) * (2 * s.heads + 2 * s.kv_heads) * s.head_dim * 2
    assert p.device_peak == one_rank.device_total + a2a
    one = seqwrap.plan(L8B, "256K", device_memory="80GB", host_memory="1TB", lora=16)
    assert p.longest_seq > 3 * one.longest_seq
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    q = seqwrap.plan(L8B, 4096, device_memory="80GB", lora=cfg)
    assert q.subject.adapter_params == s.lora_params(16, ("q", "k", "v", "o", "gate"))


def test_world_size_and_shard_plan_with_the_p_rank_model():
    """plan(world_size=, shard=) is distributed.parallel_peak's rank: K/V heads replicated when world_size does
    not divide them (Llama-8B: 8 K/V heads, 16 ranks), parameter state divided by the sharding degree."""
    from seqwrap.planning.distributed import Layout, parallel_peak

    s = DecoderShape.llama_3_1_8b()
    kw = dict(device_memory="141GB", host_memory="2TB", checkpointing=True, offload=False)
    p = seqwrap.plan(L8B, "512K", world_size=16, **kw)
    est = parallel_peak(s, p.seq_len, p.chunk_size, Layout(sp=16), dtype_bytes=2, grad_ckpt=True)
    assert (p.device_peak, p.device_breakdown) == (est.device_total, dict(est.device))
    naive = seco_peak(s, p.seq_len // 16, p.chunk_size // 16, dtype_bytes=2, grad_ckpt=True)
    assert p.device_breakdown["past K/V"] == 4 * naive.device["past K/V"]  # 32/8 heads replicated
    sharded = seqwrap.plan(L8B, "512K", world_size=16, shard=16, **kw)
    est = parallel_peak(s, sharded.seq_len, sharded.chunk_size, Layout(sp=16, shard=16), dtype_bytes=2,
                        grad_ckpt=True)
    assert sharded.device_peak == est.device_total
    assert sharded.device_breakdown["weights (sharded)"] == s.params * 2 // 16
    assert sharded.device_breakdown["optimizer state"] == s.params * 4 // 16
    assert sharded.longest_seq > p.longest_seq and sharded.shard == 16
    assert "parameters sharded over 16 ranks" in sharded.table()


def _tiny(dtype=torch.float32, lora=False, layers=2, hidden=32, vocab=61, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model


def test_a_model_is_counted_from_itself():
    pytest.importorskip("peft")
    full, adapted = _tiny(), _tiny(lora=True)
    pf = seqwrap.plan(full, 256, device_memory="1GB", min_chunk=16)
    pa = seqwrap.plan(adapted, 256, device_memory="1GB", min_chunk=16)
    n = sum(p.numel() for p in full.parameters())
    lora = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert pf.subject.adapter_params is None and pf.subject.shape.params == n and pf.subject.dtype_bytes == 4
    assert pa.subject.adapter_params == lora == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)
    assert pa.subject.shape.params == n
    assert pa.device_peak < pf.device_peak


def test_device_memory_none_reads_this_machine():
    from seqwrap.planning.budget import available_host_memory

    p = seqwrap.plan(_tiny(), 128, min_chunk=16)
    assert p.budget_source.startswith("free memory of cpu") and not p.offload
    # the model's own parameters are counted by the plan and added back to what is free
    assert abs(p.device_memory - available_host_memory()) < 2**30


def _step(model, ids, chunk):
    model.zero_grad(set_to_none=True)
    engine = seqwrap.SeCO(model, chunk_size=chunk)
    out = engine(ids)
    return engine, out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_chunk_trains_exactly_as_its_choice():
    model = _tiny(dtype=torch.float64)
    ids = torch.randint(0, 61, (1, 96), generator=torch.Generator().manual_seed(3))
    auto = seqwrap.AutoChunk(device_memory="64MB", reserve=0, min_chunk=8, target_chunk=8, max_chunk=32)
    with pytest.warns(seqwrap.AutoChunkNotice, match=r"chose chunk_size=32 \(3 chunks of 96 tokens\), offload=off, "
                                                     r"gradient checkpointing=off, predicted peak"):
        engine, loss, grads = _step(model, ids, auto)
    assert engine.chunk_size == 32 and engine.plan.chunk_size == 32
    _, ref_loss, ref = _step(model, ids, 32)
    assert loss == ref_loss and grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=0, atol=0)
    # a later step keeps the chunk size without planning again
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqwrap.AutoChunkNotice)
        engine(ids)
    # "auto" plans with the machine's free memory: a whole 96-token sequence fits in one chunk
    with pytest.warns(seqwrap.AutoChunkNotice, match=r"chunk_size=96 \(1 chunk of"):
        _, loss1, _ = _step(model, ids, "auto")


def test_auto_chunk_plans_at_a_first_evaluation_too():
    model = _tiny(dtype=torch.float64)
    ids = torch.randint(0, 61, (1, 96), generator=torch.Generator().manual_seed(4))
    engine = seqwrap.SeCO(model, chunk_size=seqwrap.AutoChunk(device_memory="64MB", reserve=0, min_chunk=8,
                                                              target_chunk=8, max_chunk=32))
    with pytest.warns(seqwrap.AutoChunkNotice, match="chose chunk_size=32") as record:
        with torch.no_grad():
            out = engine(ids)
    assert record[0].filename == __file__  # the warning names the user's line
    assert out.num_chunks == 3 and all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # HF's own loss upcasts to float32: the float64 reference from its logits
        logits = model(ids).logits
        ref = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)


def test_auto_chunk_asks_for_checkpointing_rather_than_turning_it_on():
    model = _tiny(dtype=torch.float32, layers=4, hidden=64, vocab=1000)
    ids = torch.randint(0, 1000, (1, 4096))
    # full fine-tuning: ~3 MB static; a budget the no-checkpointing plans miss at 4096 tokens
    shape = DecoderShape.from_config(model.config)
    no = seco_peak(shape, 4096, 16, dtype_bytes=4, grad_ckpt=False).device_total
    yes = seco_peak(shape, 4096, 16, dtype_bytes=4, grad_ckpt=True).device_total
    assert yes < no
    auto = seqwrap.AutoChunk(device_memory=(no + yes) // 2, reserve=0, min_chunk=16)
    engine = seqwrap.SeCO(model, chunk_size=auto)
    with pytest.raises(PlanError, match=r"nothing fits with offload=False and gradient checkpointing off as "
                                        r"configured.*"
                                        r"use seqwrap.hf.enable_checkpointing\(model\) before the first step"):
        engine(ids)
    assert all(p.grad is None for p in model.parameters())
    seqwrap.hf.enable_checkpointing(model)
    with pytest.warns(seqwrap.AutoChunkNotice, match="gradient checkpointing=on"):
        seqwrap.SeCO(model, chunk_size=auto)(ids[:, :64])  # plans and steps (64 tokens: quick)


def test_auto_chunk_bad_options():
    model = _tiny()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['chunk'\]"):
        seqwrap.AutoChunk(chunk=4)
    with pytest.raises(TypeError, match="chunk_size must be an int, 'auto' or a seqwrap.AutoChunk"):
        seqwrap.SeCO(model, chunk_size="big")
    with pytest.raises(ValueError, match="chunk_size='auto' with offload=True on a CPU model"):
        seqwrap.SeCO(model, chunk_size="auto", offload=True)(torch.randint(0, 61, (1, 32)))


def test_spaco_auto():
    model = _tiny()
    engine = seqwrap.SpaCO(model, chunk_size=seqwrap.AutoChunk(device_memory="64MB", reserve=0, min_chunk=8,
                                                               target_chunk=8, max_chunk=16), rate=0.5, seed=0)
    with pytest.warns(seqwrap.AutoChunkNotice, match=r"seqwrap.SpaCO: chunk_size='auto' chose chunk_size=16"):
        out = engine(torch.randint(0, 61, (1, 64)))
    assert out.num_chunks == 4


def test_cli_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "seqwrap", "plan", "--config", L8B, "--tokens", "1M",
                           "--device-memory", "80GB", "--host-memory", "1TB", "--lora-rank", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"engine\s+seqwrap.SeCO\(model, chunk_size=\d+, offload=True\)", out), out
    assert re.search(r"predicted device peak\s+[0-9.]+ GB", out) and "relayed K/V gradient sums" in out


@pytest.mark.parametrize("argv, pattern", [
    (["plan", "--config", L8B, "--tokens", "1M", "--device-memory", "80G"], "unknown unit 'G'"),
    (["plan", "--config", L8B, "--tokens", "1.5", "--device-memory", "80GB"], "whole number of tokens"),
    (["plan", "--config", L8B, "--tokens", "1M", "--device-memory", "80GB", "--lora-rank", "16"],
     "nothing fits .* With offload"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_cli_refuses_with_a_usage_error(argv, pattern, capsys):
    from seqwrap.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


# Calibration: the plan's predicted peak against the peak resident set of a fresh process that trains with
# that plan (benchmarks/plan_case.py; the full table is benchmarks/results/plan_calibration.md). The margin
# is a ratio of the same run's numbers: measured / predicted within [1 - MARGIN, 1 + MARGIN].
MARGIN = 0.15
SMALL = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MEDIUM = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures the resident set through /proc")
@pytest.mark.parametrize("config, lora, seq_len, budget, chosen", [
    (SMALL, None, 1024, "40MB", (256, True)),     # full fine-tuning, a tight budget: 4 chunks, checkpointing
    (MEDIUM, 8, 1024, "150MB", (512, False)),     # LoRA: 2 chunks, no checkpointing
], ids=["full-ckpt", "lora"])
def test_calibration(config, lora, seq_len, budget, chosen):
    pytest.importorskip("transformers")
    if lora:
        pytest.importorskip("peft")
    from benchmarks.plan_case import measure

    r = measure(dict(config=config, lora=lora, seq_len=seq_len, device_memory=budget,
                     options=dict(min_chunk=128, target_chunk=512, max_chunk=1024)))
    assert (r["chunk_size"], r["checkpointing"]) == chosen
    ratio = r["measured_total"] / r["predicted_total"]
    assert 1 - MARGIN <= ratio <= 1 + MARGIN, r


def test_cli_reads_a_hub_id_from_the_local_cache_only(tmp_path):
    """--config org/name: the config.json of the local Hugging Face cache (offline), laid out as the hub
    client lays it out (models--org--name/refs/main -> snapshots/<commit>/config.json)."""
    pytest.importorskip("transformers")
    repo = tmp_path / "models--test-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    cfg = dict(KNOWN_CONFIGS[L8B], num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    (snap / "config.json").write_text(json.dumps(cfg))
    env = dict(__import__("os").environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "seqwrap", "plan", "--config", "test-org/tiny-llama", "--tokens", "32K",
                           "--device-memory", "24GB", "--lora-rank", "8"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"model\s+test-org/tiny-llama: 2 layers, hidden 4096", proc.stdout), proc.stdout
