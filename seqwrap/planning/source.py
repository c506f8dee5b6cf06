"""What the planner needs to know about the thing being trained, from a model, a config or a name.

    subject = describe(model_or_config, lora="auto", dtype="auto")
    subject.shape            # memory_model.DecoderShape (params: the frozen + trained base weights)
    subject.dtype_bytes      # bytes per weight / activation element (2, 4 or 8)
    subject.adapter_params   # trainable adapter parameters (LoRA), or None for full fine-tuning

Accepted: a HF causal LM (also wrapped by peft or DDP: trainable parameters are counted from it), a
PretrainedConfig, a dict, a path to a config.json or a model directory, a name from known.py
("llama-3.1-8b"), or a Hugging Face hub id already in the local cache (read offline).

lora: "auto" - a model: its parameters that require grad (all of them: full fine-tuning; some: an
adapter); a config: full fine-tuning. None or 0: full fine-tuning. An int r: LoRA rank r on
q/k/v/o. A peft LoraConfig or a dict {"r": ..., "target_modules": [...]}: that rank on those modules.
Trainable parameters of a model that is not fully trainable are costed as float32 adapter parameters
(16 bytes each: weight, gradient, two AdamW moments) and left out of the base weights.
"""
from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass, field

import torch

from ..memory_model import DecoderShape
from .known import KNOWN_CONFIGS, known_config

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_DTYPES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4,
           "fp64": 8, "float64": 8, "double": 8}
_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down"}


@dataclass
class Subject:
    name: str
    shape: DecoderShape
    dtype_bytes: int
    adapter_params: int | None            # None: full fine-tuning
    model: torch.nn.Module | None = None  # when a model was given
    checkpointing: bool | None = None     # the model's HF gradient checkpointing (None: a config)
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def training(self) -> str:
        if self.adapter_params is None:
            return "full fine-tuning"
        return f"adapter ({self.adapter_params / 1e6:.3g}M trainable parameters)"


def describe(source, lora="auto", dtype="auto") -> Subject:
    if isinstance(source, torch.nn.Module):
        return _from_model(source, lora, dtype)
    config, name = _config_of(source)
    return _from_config(config, name, lora, dtype)


# -- configs -------------------------------------------------------------------------------------
def _config_of(source):
    """(config object with attributes, display name) from a config / dict / path / name / hub id."""
    if isinstance(source, dict):
        return _namespace(source, "config dict"), str(source.get("model_type", "config dict"))
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        known = known_config(text) if isinstance(source, str) else None
        if known is not None:
            return _namespace(known, text), text
        path = os.path.join(text, "config.json") if os.path.isdir(text) else text
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"seqwrap.plan: {path} is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ValueError(f"seqwrap.plan: {path} does not hold a JSON object (a config)")
            return _namespace(data, path), text
        return _hub_config(text), text
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):  # a transformers PretrainedConfig
        text = source.get_text_config() if callable(getattr(source, "get_text_config", None)) else source
        _check_fields(text, type(source).__name__)
        return text, str(getattr(source, "model_type", type(source).__name__))
    raise TypeError("seqwrap.plan: expected a Hugging Face model, a PretrainedConfig, a config dict, a path to a "
                    f"config.json, a known name ({', '.join(KNOWN_CONFIGS)}) or a cached hub id; "
                    f"got {type(source).__name__}")


def _hub_config(name: str):
    """A hub id from the local Hugging Face cache only (no network)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ValueError(f"seqwrap.plan: {name!r} is neither a known name ({', '.join(KNOWN_CONFIGS)}) nor a file, "
                         "and reading a hub id needs transformers") from None
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"seqwrap.plan: {name!r} is not a known name ({', '.join(KNOWN_CONFIGS)}), not a file, and "
                         f"not a hub id in the local Hugging Face cache ({str(exc).splitlines()[0]})") from None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    _check_fields(text, name)
    return text


def _namespace(data: dict, where: str):
    if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
        data = {**data["text_config"], "torch_dtype": data.get("torch_dtype", data.get("dtype"))}
    ns = types.SimpleNamespace(**data)
    _check_fields(ns, where)
    return ns


def _check_fields(config, where: str) -> None:
    missing = [k for k in _REQUIRED if not isinstance(getattr(config, k, None), int)]
    if missing:
        raise ValueError(f"seqwrap.plan: {where} lacks the decoder fields {missing} (the memory model needs "
                         f"{list(_REQUIRED)})")


def _from_config(config, name, lora, dtype) -> Subject:
    shape = DecoderShape.from_config(config)
    adapter = None if lora == "auto" else _lora_params(shape, lora)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype == "auto":
        if declared is None:
            raise ValueError(f"seqwrap.plan: {name} declares no dtype (torch_dtype): pass dtype='bf16' (or "
                             "'fp16' / 'fp32')")
        dtype = declared
    subject = Subject(name, shape, dtype_bytes(dtype), adapter,
                      max_positions=getattr(config, "max_position_embeddings", None))
    _moe_note(config, subject)
    return subject


# -- models --------------------------------------------------------------------------------------
def _from_model(model: torch.nn.Module, lora, dtype) -> Subject:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    causal_lm = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner
    config = getattr(causal_lm, "config", None)
    if config is None:
        raise TypeError(f"seqwrap.plan: {type(causal_lm).__name__} has no .config (expected a Hugging Face causal LM)")
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    _check_fields(text, type(causal_lm).__name__)
    params = {id(p): p for p in inner.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if trainable == 0 and lora == "auto":
        raise ValueError(f"seqwrap.plan: no parameter of {type(causal_lm).__name__} requires grad: nothing to train")
    if lora == "auto":
        adapter = None if trainable == total else trainable
        base = total if adapter is None else total - adapter
        shape = DecoderShape.from_config(text, params=base)
    else:
        shape = DecoderShape.from_config(text, params=total - (trainable if trainable < total else 0))
        adapter = _lora_params(shape, lora)
    if dtype == "auto":
        dtype = causal_lm.get_input_embeddings().weight.dtype
    layers = [m for m in causal_lm.modules() if getattr(m, "gradient_checkpointing", False) is True]
    subject = Subject(str(getattr(text, "model_type", type(causal_lm).__name__)), shape, dtype_bytes(dtype), adapter,
                      model=model, checkpointing=bool(layers),
                      max_positions=getattr(text, "max_position_embeddings", None))
    _moe_note(text, subject)
    return subject


# -- small parsers -------------------------------------------------------------------------------
def dtype_bytes(dtype) -> int:
    """Bytes per element of 'bf16' / 'float32' / torch.float16 / ..."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"seqwrap.plan: dtype must be a floating point type, got {dtype}")
        return dtype.itemsize
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"seqwrap.plan: unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch dtype")


def _lora_params(shape: DecoderShape, lora) -> int | None:
    if lora is None or lora == 0:
        return None
    if isinstance(lora, bool):
        raise TypeError("seqwrap.plan: lora must be 'auto', None, a rank (int), a peft LoraConfig or a dict")
    if isinstance(lora, int):
        if lora < 0:
            raise ValueError(f"seqwrap.plan: lora rank must be > 0, got {lora}")
        return shape.lora_params(lora)
    if isinstance(lora, dict):
        rank, targets = lora.get("r"), lora.get("target_modules", ("q_proj", "k_proj", "v_proj", "o_proj"))
    elif hasattr(lora, "r") and hasattr(lora, "target_modules"):
        rank, targets = lora.r, lora.target_modules
    else:
        raise TypeError(f"seqwrap.plan: lora must be 'auto', None, a rank (int), a peft LoraConfig or a dict, "
                        f"not {type(lora).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"seqwrap.plan: lora rank r must be an int > 0, got {rank!r}")
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in _TARGETS]
    if unknown:
        raise ValueError(f"seqwrap.plan: LoRA target_modules {unknown} are not modelled; known: {sorted(_TARGETS)} "
                         "(pass the model itself to count its adapter exactly)")
    return shape.lora_params(rank, tuple(_TARGETS[t] for t in targets))


def _moe_note(config, subject: Subject) -> None:
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if isinstance(experts, int) and experts > 1:
        subject.notes.append(f"mixture of experts ({experts} experts): the activation terms count one dense MLP of "
                             "intermediate_size per token; treat the prediction as a lower bound")
