"""What seqwrap.verify found: the report, the parameter groups, and the gradient comparison.

Statuses:
  exact         loss and every gradient equal full backprop of the twin within rtol
  wrong         the engine ran and some gradient (or the loss) differs by more than rtol
  refused       seqwrap raised UnsupportedModelError / NotImplementedError / ValueError (TypeError when
                applying a patch) from its adapters or engines, with every .grad still untouched
  error         anything else raised during the chunked run (the exception is in `message`)
  cannot-build  the twin could not be built, or its own full backprop failed: nothing was checked
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

STATUSES = ("exact", "wrong", "refused", "error", "cannot-build")

# (group, pattern on the parameter name), first match wins; names are dotted module paths
_GROUPS = (
    ("head", re.compile(r"(^|\.)(lm_head|embed_out|output_projection|proj_out|head|predictions|generator_lm_head|"
                        r"lm_loss|pred_layer)\.|^(output|cls)\.|(^|\.)lm_head$")),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe|word_embeddings|position_embeddings|tok_embeddings|"
                              r"token_type_embeddings|shared)\.")),
    ("norms", re.compile(r"norm|(^|\.)(ln_\w*|ln\d*|layernorm\w*|\w*_ln|\w*layer_norm\w*)\.")),
    ("attention", re.compile(r"attn|attention|(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|"
                             r"query|key|value|c_attn|wq|wk|wv|wo|sinks)\b")),
    ("mlp", re.compile(r"mlp|moe|expert|router|ffn|feed_forward|(^|\.)(gate|fc\d|c_fc|c_proj|dense_h_to_4h|"
                       r"dense_4h_to_h|w\d|up_proj|down_proj|gate_proj|intermediate|output)\b")),
    ("recurrent", re.compile(r"mixer|ssm|mamba|linear_attn|conv|rwkv|recurrent|lru|\.A_log|\.dt_bias|\.D$")),
)


def param_group(name: str) -> str:
    """The group a parameter name belongs to: head, embeddings, norms, attention, mlp, recurrent, other."""
    for group, pattern in _GROUPS:
        if pattern.search(name):
            return group
    return "other"


@dataclass
class GroupError:
    """Worst relative error (Frobenius norm of the difference / norm of the reference gradient) of a group."""

    worst: float
    param: str
    count: int


@dataclass
class VerifyReport:
    """seqwrap.verify's result. `passed` is True only for status "exact"; str(report) reads as a summary."""

    model_type: str
    model_class: str
    engine: str
    status: str
    rtol: float
    seq_len: int = 0
    chunk_size: int | None = None
    batch: int = 0
    loss: float | None = None
    reference_loss: float | None = None
    loss_error: float | None = None
    groups: dict[str, GroupError] = field(default_factory=dict)
    worst_error: float | None = None
    worst_param: str | None = None
    worst_group: str | None = None
    message: str = ""
    exception: str | None = None
    where: str = ""  # for refusals and errors: file:line of the frame that raised
    twin: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "exact"

    def bad_groups(self) -> list[str]:
        """Groups whose worst error is above rtol, worst first."""
        bad = [g for g, e in self.groups.items() if not e.worst <= self.rtol]
        return sorted(bad, key=lambda g: -_key(self.groups[g].worst))

    def format(self) -> str:
        where = f"{self.engine}" + (f" chunk {self.chunk_size}" if self.chunk_size else "")
        head = (f"seqwrap.verify: {self.model_type} ({self.model_class}), {where} on {self.batch} x {self.seq_len} "
                f"tokens, float64: {self.status.upper()}")
        if self.status in ("exact", "wrong") and self.worst_error is not None:
            head += f" (worst relative error {self.worst_error:.1e} in {self.worst_group}: {self.worst_param}; " \
                    f"rtol {self.rtol:.0e})"
        lines = [head]
        if self.twin:
            lines.append(f"  twin: {self.twin}")
        if self.message:
            label = {"refused": "refused", "error": "error", "cannot-build": "not checked"}.get(self.status, "note")
            lines.append(f"  {label}: {self.exception + ': ' if self.exception else ''}{self.message}")
            if self.where:
                lines.append(f"  raised at {self.where}")
        if self.loss is not None and self.reference_loss is not None:
            lines.append(f"  loss {self.loss:.12g} vs full backprop {self.reference_loss:.12g} "
                         f"(relative difference {self.loss_error:.1e})")
        if self.groups:
            lines.append(f"  {'group':<12} {'params':>6}  {'worst rel. error':>16}  parameter")
            for g in sorted(self.groups, key=lambda g: -_key(self.groups[g].worst)):
                e = self.groups[g]
                flag = "  <-- above rtol" if not e.worst <= self.rtol else ""
                lines.append(f"  {g:<12} {e.count:>6}  {e.worst:>16.1e}  {e.param}{flag}")
        return "\n".join(lines)

    __str__ = format


def _key(x: float) -> float:
    return math.inf if math.isnan(x) else x


def compare_grads(params, reference: dict, rtol: float, floor: float = 1e-7) -> tuple[dict[str, GroupError], float,
                                                                                   str | None]:
    """Per-group worst relative error of each parameter's .grad against reference[name] (None: no gradient).

    params: (name, parameter) pairs. Error of one parameter: ||grad - ref|| / max(||ref||, floor * G), G the
    largest reference gradient norm of the model: a gradient that is zero in exact arithmetic (a key bias
    under softmax's shift invariance) is rounding noise on both sides, compared against that floor instead
    of its own noise. A gradient one side has and the other has not counts as zeros on the other side.
    Returns (groups, worst error, its parameter's name)."""
    norms = [r.double().norm().item() for r in reference.values() if r is not None]
    scale = floor * max(norms, default=0.0)
    groups: dict[str, GroupError] = {}
    worst, worst_name = 0.0, None
    for name, p in params:
        ref, got = reference.get(name), p.grad
        if ref is None and got is None:
            err = 0.0
        else:
            ref_t = ref if ref is not None else got.new_zeros(got.shape)
            got_t = got if got is not None else ref.new_zeros(ref.shape)
            diff = (got_t.double() - ref_t.double()).norm().item()
            denom = max(ref_t.double().norm().item(), scale)
            err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        g = param_group(name)
        cur = groups.get(g)
        if cur is None:
            groups[g] = GroupError(err, name, 1)
        else:
            cur.count += 1
            if _key(err) > _key(cur.worst):
                cur.worst, cur.param = err, name
        if _key(err) > _key(worst) or worst_name is None:
            worst, worst_name = err, name
    return groups, worst, worst_name
