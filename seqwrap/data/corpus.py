"""Real text that is on every machine: the Python standard library's own sources, as bytes."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def _stdlib_files(max_bytes: int) -> list[bytes]:
    """The standard library's .py files (sorted, no tests or site-packages) until max_bytes are read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}")
    return chunks


def stdlib_bytes(max_bytes: int = 8 << 20) -> torch.Tensor:
    """Concatenated .py files of the running Python's standard library, as a uint8 tensor.

    Files are read in sorted order, so the corpus is the same on every run of
    the same Python. Stops after max_bytes bytes.
    """
    return torch.frombuffer(bytearray(b"".join(_stdlib_files(max_bytes))[:max_bytes]), dtype=torch.uint8)


def stdlib_documents(max_bytes: int = 8 << 20) -> list[torch.Tensor]:
    """The same files as stdlib_bytes, one document each: a list of 1-D uint8 tensors (empty files left out)."""
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in _stdlib_files(max_bytes) if d]


def random_windows(corpus: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) int64 byte windows at random offsets of the corpus."""
    if corpus.numel() <= length:
        raise ValueError(f"corpus of {corpus.numel()} bytes is shorter than one window of {length}")
    starts = torch.randint(0, corpus.numel() - length, (batch,), generator=generator)
    return torch.stack([corpus[s : s + length] for s in starts.tolist()]).long()
