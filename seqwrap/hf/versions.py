"""The versions of transformers and peft seqwrap supports, checked when a model is adapted or patched.

SUPPORTED holds, per package, [floor, ceiling): the floor is the oldest release the suite was run on
(`make test-oldest`), the ceiling the first release not tested yet (`make test-latest` ran on the
newest one below it). Outside the range, adapting a model raises UnsupportedVersionError naming the
installed version and the range; SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS=1 turns that into a warning
(at your own risk: a renamed internal can then fail later, or worse).

Moving the range: run `make test-latest`; when it passes, raise the ceiling here past the newest
release and refresh the lock with `make lock` (see README, "Versions").
"""
from __future__ import annotations

import os
import threading
import warnings
from importlib import metadata

from .._warn import user_stacklevel

ENV_ALLOW = "SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS"

# package -> (floor, ceiling): floor <= installed < ceiling
SUPPORTED: dict[str, tuple[str, str]] = {
    "transformers": ("5.15.1", "5.26"),
    "peft": ("0.18.0", "0.22"),
}

_checked: set[str] = set()


class UnsupportedVersionError(RuntimeError):
    """An installed package is outside the range seqwrap was tested with."""


def parse_version(text: str) -> tuple[int, ...]:
    """'5.24.0' -> (5, 24, 0); pre-/dev-release suffixes ('5.25.0.dev0', '1.2rc1') keep their numeric prefix."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # '1rc1': stop after the numeric part
            break
    return tuple(parts)


def _padded(v: tuple[int, ...]) -> tuple[int, ...]:
    return v + (0,) * (4 - len(v))


def in_range(package: str, version: str) -> bool:
    floor, ceiling = SUPPORTED[package]
    v = _padded(parse_version(version))
    return _padded(parse_version(floor)) <= v < _padded(parse_version(ceiling))


def allowed() -> bool:
    """SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS is set (1 / true / yes): versions outside the range only warn."""
    return os.environ.get(ENV_ALLOW, "").strip().lower() in ("1", "true", "yes")


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_version(package: str, what: str) -> None:
    """Raise UnsupportedVersionError if `package` is installed outside SUPPORTED (once per process
    and package when it passes). `what` names the seqwrap feature for the message."""
    if package in _checked:
        return
    version = installed(package)
    if version is None:
        raise ImportError(f"{what} needs {package} (pip install 'seqwrap[hf]')")
    if not in_range(package, version):
        floor, ceiling = SUPPORTED[package]
        msg = (f"{what}: {package} {version} is installed, but seqwrap supports {package} >= {floor}, < {ceiling} "
               f"(tested range).")
        if not allowed():
            raise UnsupportedVersionError(f"{msg} Install a supported version (pip install '{package}>={floor},"
                                          f"<{ceiling}'), or set {ENV_ALLOW}=1 to go on at your own risk.")
        warnings.warn(f"{msg} Going on because {ENV_ALLOW} is set.", UserWarning, stacklevel=user_stacklevel())
    _checked.add(package)


_verified: dict[tuple[str, str], object] = {}   # (config class, config json) -> VerifyReport
_verifying = threading.local()                   # set while seqwrap.verify runs its twin


def above_ceiling(package: str, version: str) -> bool:
    return _padded(parse_version(version)) >= _padded(parse_version(SUPPORTED[package][1]))


def check_model_versions(model, what: str) -> None:
    """transformers always; peft when any module of `model` comes from peft (a PeftModel, LoRA layers).

    A transformers release newer than the tested ceiling is not refused outright: seqwrap.verify runs this
    model's architecture (a tiny float64 twin of its config, SeCO or MsT as `what` asks) against full
    backprop once per config. Exact: go on, with a warning naming the version; anything else: refused with
    the report (UnsupportedVersionError). SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS=1 skips the check."""
    version = installed("transformers")
    if getattr(_verifying, "active", False):
        pass  # the twin of a running verify: its version question is the one being answered
    elif (version is not None and above_ceiling("transformers", version) and "transformers" not in _checked
          and not allowed()):
        _verify_newer(model, what, version)
    else:
        check_version("transformers", what)
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        check_version("peft", what)


def _verify_newer(model, what: str, version: str) -> None:
    from .verify import _config_and_class, verify

    config, _ = _config_and_class(model)
    key = (type(config).__name__, config.to_json_string(use_diff=False))
    report = _verified.get(key)
    engine = "mst" if "minisequence" in what else "seco"
    fresh = report is None
    if fresh:
        _verifying.active = True
        try:
            report = verify(model, engine=engine)
        finally:
            _verifying.active = False
        _verified[key] = report
    floor, ceiling = SUPPORTED["transformers"]
    if not report.passed:
        raise UnsupportedVersionError(
            f"{what}: transformers {version} is newer than the tested range (>= {floor}, < {ceiling}), and "
            f"seqwrap.verify of this architecture did not come out exact:\n{report}")
    if not fresh:
        return  # said when this config was verified
    warnings.warn(f"{what}: transformers {version} is newer than the tested range (< {ceiling}); seqwrap.verify ran "
                  f"a tiny float64 twin of this {config.model_type} config through {report.engine} against full "
                  f"backprop and it was exact (worst relative error {report.worst_error or 0.0:.1e}); going on",
                  UserWarning, stacklevel=user_stacklevel())
