"""From every rank's holdings to the pieces each file holds, and back again on load.

Save: each rank reports the row slices it holds (:class:`~._collect.Part` metadata). For each
global tensor the distinct row ranges must agree on shape, dtype and layout, be disjoint, and
cover ``[0, rows)`` exactly — a gap means state no rank holds (the "owner-only state saved from
rank 0" trap), an overlap a placement bug; both are refused. Identical copies (replicated state,
DDP-replicated weights) are written once, by the holder with the fewest bytes assigned so far,
largest pieces first (so replicated weights are shared out between ranks' files).

Load: the rows a rank needs are read from every piece that overlaps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardflow.checkpoint._format import CheckpointError

Range = tuple[int, int] | None


def file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass(slots=True)
class Plan:
    writer: dict[tuple[str, Range], int]
    """Which rank writes each (tensor, rows) piece."""
    tensors: dict[str, dict[str, Any]]
    """The index's ``tensors`` section: shape, dtype, layout and pieces ``[file, start, stop]``."""


def plan_pieces(metas_by_rank: list[list[dict[str, Any]]]) -> Plan:
    """Check every rank's holdings and choose one writer per distinct piece (deterministic)."""
    world_size = len(metas_by_rank)
    holders: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for rank, metas in enumerate(metas_by_rank):
        for m in metas:
            holders.setdefault(m["name"], []).append((rank, m))
    jobs = []
    tensors: dict[str, dict[str, Any]] = {}
    for name, held in holders.items():
        first = held[0][1]
        for rank, m in held:
            for field in ("shape", "dtype", "layout"):
                if m[field] != first[field]:
                    raise CheckpointError(
                        f"{name}: rank {held[0][0]} holds {field} {first[field]} but rank {rank} "
                        f"holds {m[field]}; every rank must agree on a tensor's {field}."
                    )
        ranges: dict[Range, list[tuple[int, dict[str, Any]]]] = {}
        for rank, m in held:
            rows = tuple(m["rows"]) if m["rows"] is not None else None
            ranges.setdefault(rows, []).append((rank, m))
        _check_copies_agree(name, ranges)
        _check_tiling(name, first["shape"], list(ranges))
        tensors[name] = {
            "shape": first["shape"],
            "dtype": first["dtype"],
            "layout": first["layout"],
        }
        for rows, copies in ranges.items():
            if rows is not None and rows[0] == rows[1]:
                continue
            jobs.append((copies[0][1]["bytes"], name, rows, [r for r, _ in copies]))
    load = [0] * world_size
    writer: dict[tuple[str, Range], int] = {}
    jobs.sort(key=lambda j: (-j[0], j[1], j[2] or (0, 0)))
    for size, name, rows, ranks in jobs:
        chosen = min(ranks, key=lambda r: (load[r], r))
        load[chosen] += size
        writer[(name, rows)] = chosen
    for name, record in tensors.items():
        pieces = sorted(
            (rows, rank) for (n, rows), rank in writer.items() if n == name and rows is not None
        )
        whole = [rank for (n, rows), rank in writer.items() if n == name and rows is None]
        if whole:
            record["pieces"] = [[file_name(whole[0], world_size)]]
        else:
            record["pieces"] = [[file_name(rank, world_size), a, b] for (a, b), rank in pieces]
    return Plan(writer, dict(sorted(tensors.items())))


def _check_copies_agree(name: str, ranges: dict[Range, list[tuple[int, dict[str, Any]]]]) -> None:
    for copies in ranges.values():
        digests = {m["digest"] for _, m in copies}
        if len(digests) > 1:
            ranks = [r for r, _ in copies]
            raise CheckpointError(
                f"{name} is declared 'replicated' but differs between ranks {ranks}: declare it "
                "'rows' if it is per-shard, or make the update rule reduce it over the shards."
            )


def _check_tiling(name: str, shape: list[int], ranges: list[Range]) -> None:
    """The distinct row ranges of a tensor must tile ``[0, shape[0])`` (0-d: one whole copy)."""
    if not shape:
        if ranges != [None]:
            raise CheckpointError(f"{name} is 0-d but was reported with row ranges {ranges}.")
        return
    spans = sorted(r for r in ranges if r is not None and r[0] != r[1])
    at = 0
    for start, stop in spans:
        if start != at:
            what = "held by no rank" if start > at else "held twice, differently sliced"
            lo, hi = sorted((at, start))
            raise CheckpointError(
                f"{name}: rows [{lo}, {hi}) of {shape[0]} are {what}: the placement's row ranges "
                "must partition every parameter's rows (owners hold all of them, shards tile)."
            )
        at = stop
    if at != shape[0]:
        raise CheckpointError(
            f"{name}: rows [{at}, {shape[0]}) of {shape[0]} are held by no rank: the "
            "placement's row ranges must partition every parameter's rows."
        )


def check_record(name: str, record: Any, files: dict[str, Any]) -> None:
    """Validate one index entry's structure and that its pieces tile the tensor."""
    try:
        shape, pieces = record["shape"], record["pieces"]
        record["dtype"], record["layout"]  # noqa: B018 - presence check
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise TypeError("shape")
        for piece in pieces:
            if piece[0] not in files:
                raise CheckpointError(
                    f"{name} is stored in {piece[0]!r}, which the index's file list does not name."
                )
        if not shape:
            if len(pieces) != 1 or len(pieces[0]) != 1:
                raise TypeError("pieces")
            return
        _check_tiling(name, shape, [(int(p[1]), int(p[2])) for p in pieces] or [None])
    except CheckpointError:
        raise
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise CheckpointError(f"the index entry of {name} is malformed ({exc!r}).") from exc


def overlaps(record: dict[str, Any], rows: Range) -> list[tuple[str, int, int, int, int]]:
    """For the rows wanted, ``(file, piece start, piece stop, lo, hi)`` of each overlapping piece
    (rows ``[lo, hi)`` are wanted from it); a 0-d tensor's single piece comes as ``(file, 0, 0,
    0, 0)``."""
    if rows is None:
        return [(record["pieces"][0][0], 0, 0, 0, 0)]
    start, stop = rows
    out = []
    for file, a, b in record["pieces"]:
        lo, hi = max(start, a), min(stop, b)
        if lo < hi:
            out.append((file, a, b, lo, hi))
    return out
