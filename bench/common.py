"""Pieces several benchmarks share."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the running Python's standard-library ``.py`` sources (in
    sorted path order), as a long tensor of byte values: a corpus with no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()
