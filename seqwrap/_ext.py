"""Loads the compiled core, seqwrap._C, with an error that says how to build it."""
try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "seqwrap's C extension (seqwrap._C) is not built or does not load: "
        f"{exc}. Build it with `make build` (or `pip install --no-build-isolation .`) "
        "with torch already installed."
    ) from exc

C = _C
