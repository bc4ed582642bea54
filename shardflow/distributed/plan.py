"""The owner plan: which rank does which piece of work, decided once and identically everywhere.

A :class:`Unit` is a piece of work with one owner: a whole parameter (DDP-aware placement: the
owner keeps its state and computes its update) or one Newton-Schulz matrix or tile (FSDP2-aware
placement: the owner gathers the matrix, orthogonalizes it and sends the rows back).

**Cost.** Newton-Schulz on an ``(m, n)`` matrix costs about ``m·n·min(m, n)`` multiply-adds per
iteration (the Gram matrix and the two products are each ``min(m,n)² · max(m,n)``), so that is a
unit's cost; a unit that is not orthogonalized costs 0 and is balanced by its element count
(the state it brings).

**Assignment** (:func:`assign`) is longest-processing-time first (Graham 1969): units in order of
decreasing cost (then decreasing element count, then position), each given to the rank with the
least load so far — NS load first, element count to break ties; zero-cost units afterwards by
element count first. LPT is within 4/3 of the optimal makespan and is deterministic: every rank
computes the same plan from the same shapes, with no communication.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Unit:
    """Rows ``rows`` and columns ``cols`` of the ``(out, rest)`` matrix of parameter ``index``."""

    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    cost: float
    """Newton-Schulz cost ``m·n·min(m, n)`` (0 when the unit is not orthogonalized)."""
    numel: int
    """Elements of the parameter this unit covers (its state's size)."""


def ns_cost(m: int, n: int) -> float:
    """Newton-Schulz cost of an ``(m, n)`` matrix: ``m·n·min(m, n)``."""
    return float(m) * float(n) * float(min(m, n))


def tiles(rows: int, cols: int, tile: tuple[int, int]) -> list[tuple[tuple[int, int], ...]]:
    """``((r0, r1), (c0, c1))`` of the ``tile``-shaped pieces covering a ``rows × cols`` matrix.

    Edge tiles are ragged, as :func:`shardflow.ops.orthogonalize.block_view` cuts them.
    """
    tr, tc = tile
    return [
        ((r, min(r + tr, rows)), (c, min(c + tc, cols)))
        for r in range(0, rows, tr)
        for c in range(0, cols, tc)
    ]


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(out, rest)`` matrix shape of a parameter shape (``(1, n)`` for 1-D, ``(1, 1)`` 0-D)."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, int(shape[0]))
    return (int(shape[0]), math.prod(int(s) for s in shape[1:]))


def tile_units(index: int, shape: Sequence[int], tile: tuple[int, int] | None) -> list[Unit]:
    """One unit per Newton-Schulz tile of a parameter (``tile=None``: not orthogonalized, one unit)."""
    m, n = matrix_shape(shape)
    if tile is None:
        return [Unit(index, (0, m), (0, n), 0.0, m * n)]
    return [
        Unit(index, r, c, ns_cost(r[1] - r[0], c[1] - c[0]), (r[1] - r[0]) * (c[1] - c[0]))
        for r, c in tiles(m, n, tile)
    ]


def whole_unit(index: int, shape: Sequence[int], tile: tuple[int, int] | None) -> Unit:
    """One unit for a whole parameter, costing the sum of its tiles' Newton-Schulz costs."""
    m, n = matrix_shape(shape)
    cost = sum(u.cost for u in tile_units(index, shape, tile))
    return Unit(index, (0, m), (0, n), cost, m * n)


def assign(units: Sequence[Unit], world_size: int) -> list[int]:
    """The owner rank of each unit: longest-processing-time first (see the module docstring)."""
    owners = [0] * len(units)
    order = sorted(range(len(units)), key=lambda i: (-units[i].cost, -units[i].numel, i))
    ns_load = [0.0] * world_size
    elements = [0] * world_size
    heap = [(0.0, 0, r) for r in range(world_size)]
    rest = []
    for i in order:
        u = units[i]
        if u.cost == 0:
            rest.append(i)
            continue
        _, _, r = heapq.heappop(heap)
        owners[i] = r
        ns_load[r] += u.cost
        elements[r] += u.numel
        heapq.heappush(heap, (ns_load[r], elements[r], r))
    heap = [(elements[r], ns_load[r], r) for r in range(world_size)]
    heapq.heapify(heap)
    for i in rest:
        _, _, r = heapq.heappop(heap)
        owners[i] = r
        elements[r] += units[i].numel
        heapq.heappush(heap, (elements[r], ns_load[r], r))
    return owners


@dataclass(slots=True)
class OwnerPlan:
    """Units and their owners, with the per-rank loads they add up to."""

    world_size: int
    units: list[Unit]
    owners: list[int] = field(default_factory=list)
    _lookup: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.owners:
            self.owners = assign(self.units, self.world_size)
        self._lookup = {(u.index, u.rows, u.cols): r for u, r in zip(self.units, self.owners)}

    def owner(self, index: int, rows: tuple[int, int], cols: tuple[int, int]) -> int | None:
        """The owner of that unit, or None when the plan has no such unit."""
        return self._lookup.get((index, rows, cols))

    def ns_loads(self) -> list[float]:
        """Newton-Schulz cost each rank owns."""
        loads = [0.0] * self.world_size
        for u, r in zip(self.units, self.owners):
            loads[r] += u.cost
        return loads

    def elements(self) -> list[int]:
        """Elements each rank owns."""
        out = [0] * self.world_size
        for u, r in zip(self.units, self.owners):
            out[r] += u.numel
        return out

    def counts(self) -> list[int]:
        """Units each rank owns."""
        out = [0] * self.world_size
        for r in self.owners:
            out[r] += 1
        return out

    def ns_imbalance(self) -> float:
        """``max / mean`` of the Newton-Schulz loads (1.0 = perfect; 1.0 when there is none)."""
        return imbalance(self.ns_loads())

    def element_imbalance(self) -> float:
        """``max / mean`` of the owned element counts."""
        return imbalance(self.elements())

    def describe(self, unit_name: str = "units", names: dict[int, str] | None = None) -> str:
        """A table: per rank, the units it owns, their elements and NS load (and max/mean);
        with ``names`` (parameter index → name), also which parameters those units belong to."""
        loads, elems, counts = self.ns_loads(), self.elements(), self.counts()
        total = sum(loads) or 1.0
        head = f"{'rank':>5} {unit_name:>8} {'elements':>12} {'NS load':>12} {'NS share':>9}"
        lines = [head + ("  parameters" if names else "")]
        for r in range(self.world_size):
            row = f"{r:>5} {counts[r]:>8} {elems[r]:>12} {loads[r]:>12.4g} {loads[r] / total:>9.1%}"
            if names:
                owned = dict.fromkeys(u.index for u, o in zip(self.units, self.owners) if o == r)
                listed = [names.get(i, str(i)) for i in owned]
                more = f" … (+{len(listed) - 6})" if len(listed) > 6 else ""
                row += "  " + ", ".join(listed[:6]) + more
            lines.append(row)
        lines.append(
            f"max/mean: NS load {self.ns_imbalance():.3f}, elements {self.element_imbalance():.3f}"
        )
        return "\n".join(lines)


def replicated_plan(
    shapes: Sequence[Sequence[int]], tiles: Sequence[tuple[int, int] | None], world_size: int
) -> OwnerPlan:
    """The DDP-aware plan: one unit per parameter, costing its tiles' Newton-Schulz work
    (``tiles[i]``: parameter i's Newton-Schulz tile, None when it is not orthogonalized)."""
    units = [whole_unit(i, s, t) for i, (s, t) in enumerate(zip(shapes, tiles))]
    return OwnerPlan(world_size, units)


def sharded_plan(
    shapes: Sequence[Sequence[int]], tiles: Sequence[tuple[int, int] | None], world_size: int
) -> OwnerPlan:
    """The FSDP2-aware plan: one unit per Newton-Schulz tile of each orthogonalized parameter
    (parameters with ``tiles[i] = None`` have no unit: their state lives on every rank's rows)."""
    units = [u for i, (s, t) in enumerate(zip(shapes, tiles)) if t for u in tile_units(i, s, t)]
    return OwnerPlan(world_size, units)


def imbalance(loads: Sequence[float]) -> float:
    """``max / mean`` of ``loads`` (1.0 when they are all zero)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0
