"""Memory sizes and token counts written as people write them: "80GB", "24GiB", "1TB"; "128K", "1M".

Memory units are exact: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; a bare
number is bytes. A lone "G" / "M" is refused as ambiguous (say GB or GiB). Token counts follow the
long-context convention: K = 1024, M = 2**20 (so "128K" = 131072, "1M" = 1048576).
"""
from __future__ import annotations

import math
import re

_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_TOKEN_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_NUMBER = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    m = _NUMBER.match(text)
    if m is None:
        raise ValueError(f"seqwrap.plan: {what} {text!r} is not a number with an optional unit")
    return float(m.group(1)), m.group(2).upper()


def parse_bytes(value, what: str = "memory") -> int:
    """"80GB" -> 80_000_000_000, "24GiB" -> 25_769_803_776; an int or float is taken as bytes (> 0)."""
    if isinstance(value, bool):
        raise TypeError(f"seqwrap.plan: {what} must be a size in bytes or a string like '80GB', not a bool")
    if isinstance(value, (int, float)):
        number, scale = float(value), 1
    elif isinstance(value, str):
        number, unit = _split(value, what)
        if unit not in _MEMORY_UNITS:
            hint = f" (write {unit}B for 10^n bytes or {unit}iB for 2^n)" if unit in ("K", "M", "G", "T") else ""
            raise ValueError(f"seqwrap.plan: {what} {value!r}: unknown unit {unit!r}{hint}; use B, KB, MB, GB, TB, "
                             "KiB, MiB, GiB or TiB")
        scale = _MEMORY_UNITS[unit]
    else:
        raise TypeError(f"seqwrap.plan: {what} must be a number of bytes or a string like '80GB', "
                        f"not {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"seqwrap.plan: {what} must be > 0, got {value!r}")
    return int(number * scale)


def parse_tokens(value, what: str = "seq_len") -> int:
    """"128K" -> 131072, "1M" -> 1048576, "4096" -> 4096; a whole number of tokens > 0."""
    if isinstance(value, bool):
        raise TypeError(f"seqwrap.plan: {what} must be a number of tokens, not a bool")
    if isinstance(value, int):
        number, scale = value, 1
    elif isinstance(value, str):
        number, unit = _split(value, what)
        if unit not in _TOKEN_UNITS:
            raise ValueError(f"seqwrap.plan: {what} {value!r}: unknown unit {unit!r}; use K (1024) or M (2^20)")
        scale = _TOKEN_UNITS[unit]
    else:
        raise TypeError(f"seqwrap.plan: {what} must be an int or a string like '128K', not {type(value).__name__}")
    tokens = number * scale
    if tokens != int(tokens) or tokens < 1:
        raise ValueError(f"seqwrap.plan: {what} must be a whole number of tokens >= 1, got {value!r}")
    return int(tokens)


def format_bytes(n: float) -> str:
    """Decimal units, as GPU memory is sold: 1.5 GB, 820 MB, 12 KB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def format_tokens(n: int) -> str:
    """131072 -> '128K', 1048576 -> '1M', 1572864 -> '1.5M', 3000 -> '3,000'."""
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and (n * 4) % scale == 0:
            return f"{n / scale:g}{unit}"
    return f"{n:,}"
