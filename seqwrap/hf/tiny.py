"""Tiny random-weight twins of Hugging Face causal LMs, built from a config (no download).

    config = shrink_config(model.config, seq_len=40)     # same config class, small dimensions
    twin = build_twin(config, type(model))              # same model class, float64, random weights

shrink_config keeps what the architecture *is* and makes only its sizes small:

- widths: hidden 64, 4 heads (MHA stays MHA, MQA stays MQA, else 2 KV heads) of 16, MLP 128, experts 4
  (top-2, at most 1 shared) of 32, MLA ranks 16-24, SSM states 8; a size is never made larger;
- layers: one layer per distinct layer "signature" (its entry in every per-layer list such as
  layer_types / mlp_layer_types, its membership in index lists such as mlp_only_layers, which side of
  first_k_dense_replace / max_window_layers it is on), in order, at least 2, so a sliding/full or
  dense/MoE pattern survives with 2-6 layers;
- positions: max_position_embeddings 128 (>= seq_len); a RoPE scaling's original_max_position_embeddings
  becomes seq_len // 2, so the twin's sequence crosses it (LongRoPE switches its factors there) while a
  first chunk of the default chunk size stays below it; LongRoPE factor lists and mrope sections are
  resampled to the new rotary size; sliding windows 7, attention chunks 16;
- vocabulary 128 (special token ids past it are moved to the top ids); dropout, layerdrop and router
  jitter 0; experts run their eager loop (torch's grouped_mm has no float64).

Fields are read from the config's dataclass fields, and the config class rebuilt from them
(`type(config)(**fields)`), so derived values (DeepSeek's qk_head_dim, default head_dim) follow.
OVERRIDES (tiny_overrides.py) holds the families that need more than the generic rules.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .tiny_overrides import OVERRIDES

HIDDEN, HEADS, HEAD_DIM, INTER = 64, 4, 16, 128
MOE_INTER, EXPERTS, TOP_K = 32, 4, 2
VOCAB, MAX_POS, WINDOW, MAX_LAYERS = 128, 128, 7, 6

# field name -> target value (never raised above the field's own value)
_CAP = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "embedding_dim", "word_embed_proj_dim",
                     "attention_hidden_size", "lru_width", "backbone_hidden_size", "output_embedding_size",
                     "hidden_size_per_layer_input", "ple_embed_dim"), HIDDEN),
    **dict.fromkeys(("embedding_size", "input_embedding_size", "pronunciation_embed_dim", "shape_embed_dim"), 32),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads", "num_decoder_attention_heads",
                     "num_encoder_attention_heads", "swa_num_attention_heads", "linear_num_heads",
                     "linear_num_value_heads"), HEADS),
    **dict.fromkeys(("index_n_heads", "linear_num_key_heads", "n_groups", "mamba_n_groups", "mamba_ngroups",
                     "n_group", "num_expert_group", "o_groups"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "d_head", "dim_head", "swa_head_dim",
                     "attention_head_size", "index_head_dim", "linear_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim"), HEAD_DIM),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim", "d_rel"), 8),
    **dict.fromkeys(("kv_lora_rank", "o_lora_rank", "adapter_rank", "laurel_rank", "gated_norm_rank",
                     "loop_gate_rank", "hc_lowrank"), 16),
    "q_lora_rank": 24,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "dff", "dim_ff", "d_inner", "d_ff", "intermediate_size_mlp",
                     "dense_intermediate_size", "feed_forward_size", "mamba_d_ssm"), INTER),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "shared_intermediate_size", "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "expert_intermediate_size", "router_hidden_size"), MOE_INTER),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_routed_experts", "num_centroids"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k",
                     "centroid_intermediate_top_k", "zero_expert_num"), TOP_K),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "topk_group"), 1),
    **dict.fromkeys(("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size"),
                    VOCAB),
    **dict.fromkeys(("pronunciation_vocab_size", "shape_vocab_size", "num_buckets", "position_bias_num_buckets"), 32),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "seq_length", "context_length", "max_target_positions", "model_max_length",
                     "position_bias_max_distance", "relative_max_distance", "rel_extent", "log_scaling_n_floor",
                     "floor_scale"), MAX_POS),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "window_size", "attention_window_size",
                     "local_attention_window_len", "keep_window_size"), WINDOW),
    **dict.fromkeys(("local_attention", "attention_chunk_size", "index_topk"), 16),
    **dict.fromkeys(("index_topk_blocks", "L_cycles"), 2),
    "index_block_size": 8,
    **dict.fromkeys(("encoder_hash_byte_group_vocab", "ngram_vocab_size_base"), 64),
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 8),
    **dict.fromkeys(("mamba_d_conv", "conv_kernel", "conv_kernel_size", "conv1d_width", "linear_conv_kernel_dim",
                     "short_conv_kernel_size", "conv_L_cache", "ple_conv_kernel_size"), 4),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 8),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("chunk_size_feed_forward",), 0),
    "pretraining_tp": 1,
}
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "swa_num_key_value_heads", "num_query_groups",
             "multi_query_group_num")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers")
_ZEROED = ("layerdrop", "router_jitter_noise", "router_z_loss_coef", "jitter_noise", "drop_path_rate")
# scalars that split the layers at an index: layers below it are of one kind, the others of another
_SPLITS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers", "moe_layer_start_index")


def shrink_config(config, *, seq_len: int = 40):
    """A config of the same class as `config`, with the small sizes above; the twin's sequence is seq_len long."""
    cls = type(config)
    kw = shrink_fields(_fields(config), cls, seq_len)
    overrides = OVERRIDES.get(getattr(config, "model_type", ""), {})
    kw.update(copy.deepcopy(overrides))
    new = cls(**kw)
    new._experts_implementation = "eager"  # torch's grouped_mm has no float64
    return new


def build_twin(config, model_cls, *, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """model_cls(config) in `dtype`, every weight randomised (some families initialise norms, biases
    or gates to constants, which would hide a wrong gradient), dropout off, in train mode."""
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.02)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model.train()


def special_token_ids(config) -> set[int]:
    """Token ids the config gives a meaning (bos, eos, pad, image tokens...): inputs avoid them."""
    ids: set[int] = set()
    for key, value in _flat_items(config.to_dict()):
        if _is_token_id_key(key):
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
    return ids


# -- the generic rules ------------------------------------------------------------------------------
def _fields(config) -> dict:
    """The config's dataclass fields as a dict (derived attributes left out: the class recomputes them)."""
    names = {f.name for f in dataclasses.fields(type(config))} if dataclasses.is_dataclass(config) else None
    d = config.to_dict()
    if names is not None:
        d = {k: v for k, v in d.items() if k in names}
    for k in ("transformers_version", "architectures", "id2label", "label2id", "_name_or_path", "dtype"):
        d.pop(k, None)
    return d


def shrink_fields(d: dict, cls, seq_len: int) -> dict:
    """The generic rules applied to a dict of config fields (nested sub-config dicts included)."""
    d = copy.deepcopy(d)
    old = copy.deepcopy(d)
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text_config, vision_config...)
            d[key] = shrink_fields(value, None, seq_len)
        elif isinstance(value, bool) or value is None:
            continue
        elif key in _CAP and isinstance(value, int):
            d[key] = min(value, _CAP[key]) if _CAP[key] else 0
        elif key in _CAP and key == "intermediate_size" and isinstance(value, list):
            d[key] = [min(v, INTER) for v in value]
        elif isinstance(value, float) and (key in _ZEROED or "dropout" in key or "pdrop" in key
                                           or key.endswith("drop_prob") or key.endswith("drop_rate")):
            d[key] = 0.0
    if "head_dim" in d and d["head_dim"] is None and "num_attention_heads" in d:
        d["head_dim"] = _head_dim(d)  # several defaults leave it None and the modeling code reads it
    _shrink_kv_heads(d, old)
    _shrink_value_head(d, old)
    _shrink_rotary_dim(d, old)
    _select_layers(d, old)
    _shrink_positions(d, old, seq_len)
    _remap_token_ids(d, old)
    return d


def _shrink_kv_heads(d, old):
    heads = next((old[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads") if k in old), None)
    for key in _KV_HEADS:
        v = old.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        new_heads = next((d[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads") if k in d), HEADS)
        d[key] = 1 if v == 1 else new_heads if v == heads else min(v, 2)
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and isinstance(d.get("num_attention_heads"),
                                                                                        int):
        # None means one per head; some modeling code divides by it
        d["num_key_value_heads"] = d["num_attention_heads"]


def _shrink_value_head(d, old):
    """v_head_dim equal to the query/key head size stays equal; different stays different (MLA, MiMo)."""
    v = old.get("v_head_dim")
    if not isinstance(v, int):
        return
    qk_old = old.get("qk_nope_head_dim", 0) + old.get("qk_rope_head_dim", 0) if "qk_nope_head_dim" in old \
        else old.get("head_dim")
    qk_new = d.get("qk_nope_head_dim", 0) + d.get("qk_rope_head_dim", 0) if "qk_nope_head_dim" in d \
        else d.get("head_dim", HEAD_DIM)
    d["v_head_dim"] = qk_new if v == qk_old else max(2, qk_new // 2)
    if old.get("head_dim") is not None and old.get("head_dim") == old.get("qk_rope_head_dim"):
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA configs whose rotary size is head_dim (LongCat)
    if isinstance(d.get("qk_head_dim"), int) and "qk_nope_head_dim" in d:  # a field in some MLA configs
        d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]


def _head_dim(d) -> int:
    hd = d.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    width = next((d[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(d.get(k), int)), HIDDEN)
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "n_heads") if isinstance(d.get(k), int)), HEADS)
    return max(1, width // max(1, heads))


def _shrink_rotary_dim(d, old):
    """An absolute rotary_dim (GPT-J, CodeGen) keeps its fraction of the head."""
    r = old.get("rotary_dim")
    if isinstance(r, int) and r > 0:
        frac = r / _head_dim(old)
        d["rotary_dim"] = max(2, 2 * round(frac * _head_dim(d) / 2))


# -- layers -------------------------------------------------------------------------------------------
def _select_layers(d, old):
    """One layer per distinct signature, in order (at least 2, at most MAX_LAYERS); per-layer lists,
    index lists and split indices follow the selection."""
    key = next((k for k in _LAYER_COUNTS if isinstance(old.get(k), int) and not isinstance(old.get(k), bool)), None)
    if key is None:
        return
    n = old[key]
    per_layer = [k for k, v in old.items() if isinstance(v, list) and len(v) == n and n > 1 and not _is_token_id_key(k)]
    index_lists = [k for k, v in old.items() if k not in per_layer and isinstance(v, list) and v
                   and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in v)
                   and not _is_token_id_key(k) and (k.endswith("layers") or k.endswith("ids") or k.endswith("idxs")
                                                     or k.endswith("indices"))]
    splits = [k for k in _SPLITS if isinstance(old.get(k), int) and not isinstance(old.get(k), bool)]
    per_index = [k for k, v in old.items() if isinstance(v, dict) and v and all(str(i).isdigit() for i in v)]

    def signature(i):
        return (tuple(_hashable(old[k][i]) for k in per_layer) + tuple(i in old[k] for k in index_lists)
                + tuple(i < old[k] for k in splits) + tuple(str(_at(old[k], i)) for k in per_index))

    chosen, seen = [], set()
    for i in range(n):
        s = signature(i)
        if s not in seen:
            seen.add(s)
            chosen.append(i)
    chosen = chosen[:MAX_LAYERS]
    for i in range(n):
        if len(chosen) >= min(2, n):
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort()
    d[key] = len(chosen)
    for k in _LAYER_COUNTS[1:]:  # encoder-decoders list their decoder layers apart
        if k in d and k != key and isinstance(old.get(k), int) and old[k] == n:
            d[k] = len(chosen)
    if "encoder_layers" in d and isinstance(d["encoder_layers"], int):
        d["encoder_layers"] = min(d["encoder_layers"], 2)
    for k in per_layer:
        d[k] = [old[k][i] for i in chosen]
    for k in index_lists:
        d[k] = [j for j, i in enumerate(chosen) if i in old[k]]
    for k in splits:
        d[k] = sum(i < old[k] for i in chosen)
    for k in per_index:  # heterogeneous configs: {layer index: that layer's own fields}, renumbered
        d[k] = {new: _at(old[k], i) for new, i in enumerate(chosen) if _at(old[k], i) is not None}
    if "moe_layer_end_index" in d and isinstance(old.get("moe_layer_end_index"), int):
        d["moe_layer_end_index"] = len(chosen) - 1 if old["moe_layer_end_index"] < 0 else \
            max(0, sum(i <= old["moe_layer_end_index"] for i in chosen) - 1)


def _at(per_index: dict, i: int):
    """Layer i's entry of an index-keyed dict (keys int, or str after a JSON round trip), or None."""
    return per_index.get(i, per_index.get(str(i)))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else str(v) if isinstance(v, dict) else v


# -- positions --------------------------------------------------------------------------------------
def _shrink_positions(d, old, seq_len):
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length"):
        if isinstance(d.get(key), int) and not isinstance(d[key], bool):
            d[key] = max(d[key], seq_len)  # the twin's sequence fits
    switch = seq_len // 2  # where length-dependent RoPE scalings switch, crossed by the twin's sequence
    if isinstance(old.get("original_max_position_embeddings"), int):
        d["original_max_position_embeddings"] = switch
    rope = d.get("rope_parameters")
    if isinstance(rope, dict):
        nested = all(isinstance(v, dict) or v is None for v in rope.values()) and rope
        for params in (rope.values() if nested else [rope]):
            if isinstance(params, dict):
                _shrink_rope(params, d, switch)


def _shrink_rope(params: dict, d: dict, switch: int):
    if isinstance(params.get("original_max_position_embeddings"), int):
        params["original_max_position_embeddings"] = switch
    frac = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
    rot_dim = d.get("qk_rope_head_dim") or d.get("rotary_dim") or int(_head_dim(d) * frac)
    half = max(1, rot_dim // 2)
    for key in ("short_factor", "long_factor"):
        if isinstance(params.get(key), list) and params[key]:
            params[key] = _resample(params[key], half)
    section = params.get("mrope_section")
    if isinstance(section, list) and section and sum(section) > half:
        params["mrope_section"] = _split_like(section, half)


def _resample(values: list, n: int) -> list:
    """n values picked evenly from `values` (first and last kept)."""
    if n == 1:
        return [values[0]]
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def _split_like(parts: list[int], total: int) -> list[int]:
    """Integers proportional to `parts`, each >= 1 where possible, summing to `total`."""
    s = sum(parts)
    out = [max(1, math.floor(p * total / s)) for p in parts]
    i = 0
    while sum(out) != total:
        j = i % len(out)
        if sum(out) < total:
            out[j] += 1
        elif out[j] > 1:
            out[j] -= 1
        i += 1
        if i > 10 * total + 10:
            break
    return out


# -- token ids ------------------------------------------------------------------------------------------
def _is_token_id_key(key: str) -> bool:
    return key.endswith("token_id") or key.endswith("token_ids") or key.endswith("token_index") \
        or key in ("bos_index", "eos_index", "pad_index", "unk_index", "mask_index")


def _remap_token_ids(d, old):
    """Special ids at or past the new vocabulary size move to the top ids (the same old id -> the same new id)."""
    vocab = d.get("vocab_size")
    if not isinstance(vocab, int):
        return
    moved: dict[int, int] = {}

    def remap(v):
        if not isinstance(v, int) or isinstance(v, bool) or v < vocab:
            return v
        if v not in moved:
            moved[v] = vocab - 1 - len(moved)
        return moved[v]

    for key, value in list(d.items()):
        if _is_token_id_key(key):
            d[key] = [remap(v) for v in value] if isinstance(value, list) else remap(value)


def _flat_items(d: dict):
    for key, value in d.items():
        if not isinstance(key, str):  # id2label and the like
            continue
        if isinstance(value, dict):
            yield from _flat_items(value)
        else:
            yield key, value
