"""seqwrap.verify: check that seqwrap trains *your* architecture exactly, on a tiny float64 twin.

    report = seqwrap.verify(model)                  # or a config; engine="mst" for mini-sequence training
    print(report)                                   # status, loss, worst relative error per parameter group
    assert report.passed

The twin (tiny.py) has the model's config class and model class, its layer pattern, positional scheme
and head transforms, with small sizes and random float64 weights; its sequence crosses the positions
where length-dependent RoPE scalings switch. verify runs one chunked step (SeCO(twin, chunk_size)(ids,
labels=...), or the MsT-patched twin's loss.backward()) and full backprop of the same twin
(twin(ids, labels=...).loss.backward(), HF's whole loss, auxiliary terms included), both inside
pure_float64() (float64.py) with float64 as torch's default dtype, and with dropout off, and compares
the loss and every parameter's gradient.
A refusal counts as a refusal only if it came from seqwrap's own code and left every .grad untouched.
"""
from __future__ import annotations

import os
import time
import traceback

import torch
from torch import nn

from .compat import UnsupportedModelError
from .float64 import pure_float64
from .tiny import build_twin, shrink_config, special_token_ids
from .verify_report import VerifyReport, compare_grads

ENGINES = ("seco", "mst")
_SEQWRAP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.abspath(__file__)


def verify(model_or_config, *, engine: str = "seco", chunk_size: int | None = None, seq_len: int | None = None,
           seed: int = 0, rtol: float = 1e-9, batch: int = 2, engine_options: dict | None = None,
           mlp_chunks: int = 3, model_class=None) -> VerifyReport:
    """Runs `engine` on a tiny float64 twin of `model_or_config` against full backprop of the twin.

    model_or_config: a HF causal LM (peft / DDP wrappers are looked through; the twin has no adapters)
        or its config (the model class is then `model_class`, by default the config's model_type in
        transformers' causal-LM auto mapping).
    engine: "seco" (SeCO with chunk_size; engine_options go to seqwrap.SeCO, e.g. {"attention": "concat"})
        or "mst" (apply_minisequence(twin, mlp_chunks=mlp_chunks)).
    seq_len: twin tokens per row (default 40); chunk_size: default 3/10 of it (12: 4 chunks, the last short).
    rtol: largest relative error (per parameter, Frobenius) and loss difference that counts as exact.
    Never raises for what it finds: every outcome is a status of the returned VerifyReport."""
    if engine not in ENGINES:
        raise ValueError(f"seqwrap.verify: engine must be one of {ENGINES}, got {engine!r}")
    seq_len = 40 if seq_len is None else int(seq_len)
    if seq_len < 4:
        raise ValueError(f"seqwrap.verify: seq_len must be >= 4, got {seq_len}")
    if engine == "seco":
        chunk_size = max(2, seq_len * 3 // 10) if chunk_size is None else int(chunk_size)
    start = time.perf_counter()
    config, model_cls = _config_and_class(model_or_config)
    model_cls = model_class or model_cls
    report = VerifyReport(model_type=str(getattr(config, "model_type", "?")), model_class=model_cls.__name__
                          if model_cls is not None else "?", engine="SeCO" if engine == "seco" else "MsT",
                          status="cannot-build", rtol=rtol, seq_len=seq_len, batch=batch,
                          chunk_size=chunk_size if engine == "seco" else None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # constants the model makes (torch.full(finfo.min)) in float64 too
    try:
        _run(report, config, model_cls, engine, seed, engine_options or {}, mlp_chunks)
    finally:
        torch.set_default_dtype(previous)
        report.seconds = time.perf_counter() - start
    return report


def _config_and_class(obj):
    """(config, model class) of a model or a config."""
    if isinstance(obj, nn.Module):
        inner = getattr(obj, "module", obj) if type(obj).__name__ == "DistributedDataParallel" else obj
        if callable(getattr(inner, "get_base_model", None)):  # peft
            inner = inner.get_base_model()
        return inner.config, type(inner)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    import transformers

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(obj, "model_type", None))
    return obj, getattr(transformers, name, None) if name else None


def _run(report: VerifyReport, config, model_cls, engine, seed, options, mlp_chunks):
    # -- the twin and its own full backprop: a failure here means nothing could be checked ----------
    if model_cls is None:
        report.message = f"model_type '{report.model_type}' has no causal-LM class in transformers' auto mapping"
        return
    try:
        tiny = shrink_config(config, seq_len=report.seq_len)
        twin = build_twin(tiny, model_cls, seed=seed)
        if hasattr(twin.config, "use_cache"):
            twin.config.use_cache = False  # a training step keeps no cache (SeCO passes its own, use_cache=True)
        ids, labels = _inputs(tiny, report.batch, report.seq_len, seed)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        report.exception, report.message = type(exc).__name__, f"the twin does not build: {_short(exc)}"
        report.where = _origin(exc)
        return
    try:
        report.twin = describe(tiny, twin)
    except Exception as exc:  # noqa: BLE001 - heterogeneous configs refuse some global reads
        report.twin = f"{type(twin).__name__} ({type(exc).__name__} describing it)"
    try:
        with pure_float64():
            ref_loss = twin(input_ids=ids, labels=labels).loss
            if ref_loss is None:
                raise RuntimeError("the model returned no loss for labels=...")
            ref_loss.backward()
    except Exception as exc:  # noqa: BLE001
        report.exception, report.message = type(exc).__name__, f"full backprop of the twin fails: {_short(exc)}"
        report.where = _origin(exc)
        return
    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    reference = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params}
    report.reference_loss = float(ref_loss.detach())
    twin.zero_grad(set_to_none=True)
    if not any(g is not None and bool(g.abs().sum() > 0) for g in reference.values()):
        report.message = "full backprop of the twin gives no gradient at all"
        return

    # -- the chunked run --------------------------------------------------------------------------
    phase = "setup"
    try:
        with pure_float64():
            if engine == "seco":
                from ..engines import SeCO

                step = SeCO(twin, chunk_size=report.chunk_size, **options)
                phase = "step"
                loss = step(ids, labels=labels).loss
            else:
                from .minisequence import apply_minisequence

                apply_minisequence(twin, mlp_chunks=mlp_chunks)
                phase = "step"
                loss = twin(input_ids=ids, labels=labels).loss
                loss.backward()
    except Exception as exc:  # noqa: BLE001
        untouched = all(p.grad is None for _, p in params)
        report.exception, report.message = type(exc).__name__, _short(exc)
        report.where = _origin(exc)
        report.status = "refused" if _is_refusal(exc, phase) and untouched else "error"
        if not untouched:
            report.message += " (raised after .grad was written)"
        return
    report.loss = float(loss.detach())
    report.loss_error = abs(report.loss - report.reference_loss) / max(abs(report.reference_loss), 1e-300)
    report.groups, report.worst_error, report.worst_param = compare_grads(params, reference, report.rtol)
    report.worst_group = next((g for g, e in report.groups.items() if e.param == report.worst_param), None)
    exact = report.loss_error <= report.rtol and report.worst_error <= report.rtol
    report.status = "exact" if exact else "wrong"
    if not report.loss_error <= report.rtol:
        report.message = f"the loss differs from full backprop's by {report.loss_error:.1e} (relative)"


def _is_refusal(exc: BaseException, phase: str) -> bool:
    """A documented refusal: one of the refusal types, raised by seqwrap's adapters or engines (seqwrap/hf,
    seqwrap/engines, seqwrap/parallel), not by the model or by an op's argument check."""
    kinds = (UnsupportedModelError, NotImplementedError, ValueError) + ((TypeError,) if phase == "setup" else ())
    if not isinstance(exc, kinds):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    origin = os.path.abspath(frames[-1].filename)
    # the adapters and engines refuse models; an op's argument check reached mid-step (a hidden size that does
    # not fit the head, say) is a bug showing, not a refusal
    return origin != _HERE and any(origin.startswith(os.path.join(_SEQWRAP_DIR, d) + os.sep)
                                   for d in ("hf", "engines", "parallel"))


def _origin(exc: BaseException) -> str:
    """'path/inside/package.py:line in function' of the frame that raised (site-packages prefix cut)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith("float64.py")]
    if not frames:
        return ""
    f = frames[-1]
    path = f.filename.replace(os.sep, "/")
    for marker in ("site-packages/", "/seqwrap/"):
        if marker in path:
            path = ("seqwrap/" if marker == "/seqwrap/" else "") + path.rsplit(marker, 1)[1]
            break
    where = f"{path}:{f.lineno} in {f.name}"
    ours = [g for g in frames if g.filename.startswith(_SEQWRAP_DIR + os.sep) and g.filename != _HERE]
    if ours and ours[-1] is not f:
        g = ours[-1]
        where += f", from seqwrap/{os.path.relpath(g.filename, _SEQWRAP_DIR)}:{g.lineno} in {g.name}"
    return where


def _inputs(config, batch: int, seq_len: int, seed: int):
    """input_ids (batch, seq_len) avoiding the config's special ids, labels = ids with a few ignored (-100)."""
    vocab = int(getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 128))
    special = special_token_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    g = torch.Generator().manual_seed(1000 + seed)
    ids = allowed[torch.randint(len(allowed), (batch, seq_len), generator=g)]
    labels = ids.clone()
    labels[0, : seq_len // 8] = -100  # a prompt without loss, and a hole in the second row
    labels[-1, seq_len // 2] = -100
    return ids, labels


def describe(config, model) -> str:
    """One line: the twin's class, sizes and layer pattern."""
    def get(*names):
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    parts = [type(model).__name__, f"hidden {get('hidden_size', 'd_model', 'n_embd')}",
             f"{get('num_hidden_layers', 'n_layer', 'n_layers', 'num_layers', 'decoder_layers')} layers",
             f"heads {get('num_attention_heads', 'n_head', 'n_heads', 'num_heads')}"
             f"/{get('num_key_value_heads', 'num_kv_heads', 'n_kv_heads')}",
             f"vocab {get('vocab_size')}"]
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list):
        parts.append("layers " + ",".join(str(k) for k in kinds))
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        types = {rope.get("rope_type")} if "rope_type" in rope else {v.get("rope_type") for v in rope.values()
                                                                      if isinstance(v, dict)}
        parts.append("rope " + "/".join(sorted(str(t) for t in types)))
    parts.append(f"{sum(p.numel() for p in model.parameters())} params")
    return ", ".join(parts)


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
