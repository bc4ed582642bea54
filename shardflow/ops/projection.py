"""Seeded random projections, regenerated on every rank instead of stored or communicated.

A projection is a ``(width, rank)`` matrix ``P`` with i.i.d. ``N(0, 1/rank)`` entries, so that
``‖x·P‖ ≈ ‖x‖`` for a row ``x`` (Johnson-Lindenstrauss). It is a pure function of its key
``(seed, width, rank, refresh)``: :func:`projection` draws it from a CPU ``torch.Generator``
seeded by a hash of the key, so every rank, every world size and every restart gets the same
bits, and a checkpoint needs to carry only ``seed`` (and the step, from which the refresh index
``(step − 1) // proj_update_freq`` follows).

Projecting on the *column* side (``R = G·P`` for a ``(rows, width)`` matrix ``G``) keeps each row
of ``R`` computable from the same row of ``G``: a row shard (FSDP2 ``Shard(0)``) needs nothing
from other ranks.

Projections are keyed by width, not by parameter: every matrix with the same number of columns
shares one ``P`` per refresh. Per-parameter projections would cost ``width × rank`` floats per
matrix — on SmolLM2-135M shapes about 1.5 bytes per parameter in fp32 (rank 256), a third of the
whole state budget — while each parameter's channel scales are computed from its own rows only, so
sharing ``P`` changes nothing about any single parameter's estimate.

:class:`ProjectionCache` keeps the projections of the current refresh, on the compute device
(``device="param"``) or in (pinned, when CUDA is available) CPU memory (``device="cpu"``), copied
to the compute device only while used.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

PROJECTION_DEVICES = ("param", "cpu")
"""Where :class:`ProjectionCache` keeps projections between uses."""


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def projection(
    seed: int, width: int, rank: int, refresh: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The ``(width, rank)`` projection for this key, on the CPU, entries ``N(0, 1/rank)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed("whiteflow-projection", seed, width, rank, refresh))
    p = torch.randn(width, rank, generator=gen, dtype=torch.float32)
    return p.mul_(1.0 / math.sqrt(rank)).to(dtype)


class ProjectionCache:
    """The projections in use, keyed ``(seed, width, rank, refresh, dtype)``.

    ``get`` returns the projection on the requested device. With ``device="param"`` it is kept
    there; with ``device="cpu"`` it is kept in CPU memory (pinned when CUDA is available, so the
    copy is asynchronous) and moved with ``non_blocking=True`` at each use. :meth:`retain` drops
    every entry not used since the previous call (the optimizer calls it once per step), so at
    most one refresh's projections are held.
    """

    def __init__(self, device: str = "param") -> None:
        if device not in PROJECTION_DEVICES:
            raise ValueError(
                f"projection_device={device!r} is invalid: choose one of "
                f"{list(PROJECTION_DEVICES)} ('param' keeps projections on the parameter's "
                "device, 'cpu' keeps them in CPU memory between uses)."
            )
        self.device = device
        self._store: dict[tuple, Tensor] = {}
        self._used: set[tuple] = set()

    def get(
        self,
        seed: int,
        width: int,
        rank: int,
        refresh: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """The projection for this key on ``device`` (generated on first use)."""
        home = torch.device("cpu") if self.device == "cpu" else torch.device(device)
        key = (seed, width, rank, refresh, dtype, home)
        self._used.add(key)
        p = self._store.get(key)
        if p is None:
            p = projection(seed, width, rank, refresh, dtype)
            if self.device == "cpu":
                if torch.cuda.is_available():
                    p = p.pin_memory()
            else:
                p = p.to(home)
            self._store[key] = p
        return p.to(device, non_blocking=True)

    def retain(self) -> None:
        """Forget the projections not used since the last call."""
        for key in [k for k in self._store if k not in self._used]:
            del self._store[key]
        self._used = set()

    def bytes(self) -> int:
        """Bytes held by cached projections (not optimizer state: they are regenerated)."""
        return sum(p.numel() * p.element_size() for p in self._store.values())

    def tensors(self) -> list[Tensor]:
        """The cached projections (for inspection and tests)."""
        return list(self._store.values())
