"""Bytes each rank sends per optimizer step, by collective and by link: a model from shapes.

For the dry run (:mod:`shardflow.train.plan`) and ``bench/comm_model.py``. The accounting is the
one :func:`shardflow.distributed.comm.record_collectives` counts with (ring all-reduce:
``2·n·(W−1)/W`` each way; all-gather and reduce-scatter: ``(W−1)`` chunks each way; all-to-all:
every split but one's own), so a prediction and a counted run compare directly.

What one step moves, per rank (``S`` ranks per shard group, ``R`` replicas, ``A`` micro-batches):

- FSDP2 / HSDP (``fully_shard``): dim 0 of every parameter is padded to a multiple of ``S`` and
  split evenly; an all-gather of the padded shard per forward and per backward of every
  micro-batch (the root module's parameters once per micro-batch: FSDP2 keeps them after the
  forward), one reduce-scatter of the gradients on the last micro-batch, and under HSDP one
  all-reduce of the gradient shard across the replicas. The optimizer's Newton-Schulz
  all-to-alls (two, in ``wire`` bytes per element) move every row of every unit that another
  rank of the shard group owns: exact per rank from the owner plan and the row split.
- DDP-aware owner plan: the all-to-all of the gradients to their owners (none when a DDP wrapper
  reduced them: then DDP's all-reduce of every gradient) and the byte-packed all-gather of the
  updated parameters, padded to the largest owner's bytes.

Scalar all-reduces (norms, ⊥Grad sums: a few values per parameter) are not modelled.

**Links.** A collective whose group lies inside one node is intra-node; one whose group spans
nodes is counted inter-node (its ring or pairwise traffic crosses the slower link). Under HSDP
with the shard group = one node, only the gradient all-reduce crosses nodes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardflow.distributed.plan import OwnerPlan, matrix_shape, sharded_plan, tile_units


@dataclass(frozen=True, slots=True)
class Param:
    """What the model needs of a parameter: its shape, element bytes, Newton-Schulz tile
    (None: not orthogonalized) and whether it belongs to the root module (gathered once per
    micro-batch under FSDP2)."""

    shape: tuple[int, ...]
    elem_bytes: int
    tile: tuple[int, int] | None = None
    root: bool = False


@dataclass(frozen=True, slots=True)
class Traffic:
    """One collective's bytes for one rank per step."""

    collective: str
    link: str
    """"intra-node" or "inter-node"."""
    sent: int
    received: int


def fsdp_rows(rows: int, shard: int) -> list[int]:
    """Rows each of ``shard`` ranks holds under ``fully_shard`` (``torch.chunk``: ``⌈rows/S⌉``
    each, the last ones fewer or none)."""
    per = math.ceil(rows / shard) if rows else 0
    return [max(0, min(per, rows - r * per)) for r in range(shard)]


def _padded_shard(p: Param, shard: int) -> int:
    """Elements of one rank's padded FSDP2 shard (dim 0 of the tensor, whatever its rank)."""
    rows = p.shape[0] if p.shape else 1
    return math.ceil(rows / shard) * math.prod(p.shape[1:])


def link_of(group_ranks: Sequence[int], node_size: int) -> str:
    """ "intra-node" when the ranks share a node (``node_size`` ranks per node), else inter."""
    nodes = {r // node_size for r in group_ranks}
    return "intra-node" if len(nodes) <= 1 else "inter-node"


def ns_all_to_all(
    params: Sequence[Param], shard: int, wire_bytes: int, plan: OwnerPlan | None = None
) -> list[int]:
    """Bytes each shard rank sends over the two Newton-Schulz all-to-alls (and, as many,
    receives): round 1 its rows of every unit another rank owns, round 2 the other ranks' rows
    of the units it owns, back. ``plan``: the FSDP2 owner plan (built here when None)."""
    plan = plan or sharded_plan([p.shape for p in params], [p.tile for p in params], shard)
    offsets = []
    for p in params:
        split = fsdp_rows(matrix_shape(p.shape)[0], shard)
        offsets.append([sum(split[:r]) for r in range(shard + 1)])
    moved = [0] * shard
    for u, owner in zip(plan.units, plan.owners):
        off, width = offsets[u.index], u.cols[1] - u.cols[0]
        first = max(0, bisect.bisect_right(off, u.rows[0]) - 1)
        for r in range(first, shard):
            if off[r] >= u.rows[1]:
                break
            if r == owner:
                continue
            n = max(0, min(u.rows[1], off[r + 1]) - max(u.rows[0], off[r])) * width
            moved[r] += n  # round 1 out, round 2 in
            moved[owner] += n  # round 1 in, round 2 out
    return [m * wire_bytes for m in moved]


def sharded_step(
    params: Sequence[Param],
    *,
    shard: int,
    replicas: int = 1,
    node_size: int | None = None,
    rank: int = 0,
    micro_batches: int = 1,
    wire_bytes: int = 2,
    grad_bytes: int | None = None,
    ns: Sequence[int] | None = None,
) -> list[Traffic]:
    """FSDP2 (``replicas=1``) or HSDP traffic of shard rank ``rank`` per step (module doc).
    ``node_size``: ranks per node (default: the shard group is one node); ``grad_bytes``:
    gradient element bytes (default: each parameter's); ``ns``: :func:`ns_all_to_all`'s result,
    when already computed for every rank."""
    node_size = node_size or shard
    shard_link = link_of(range(shard), node_size)
    replica_link = link_of([r * shard for r in range(replicas)], node_size)
    gathered = sum(_padded_shard(p, shard) * p.elem_bytes * (1 if p.root else 2) for p in params)
    grads = sum(_padded_shard(p, shard) * (grad_bytes or p.elem_bytes) for p in params)
    out = [
        Traffic("FSDP2 all-gather", shard_link, *[gathered * (shard - 1) * micro_batches] * 2),
        Traffic("FSDP2 reduce-scatter", shard_link, *[grads * (shard - 1)] * 2),
    ]
    if replicas > 1:
        moved = 2 * grads * (replicas - 1) // replicas
        out.append(Traffic("HSDP all-reduce", replica_link, moved, moved))
    moved = (ns or ns_all_to_all(params, shard, wire_bytes))[rank]
    if moved:
        out.append(Traffic("NS all-to-all (2 rounds)", shard_link, moved, moved))
    return out


def replicated_step(
    params: Sequence[Param],
    owners: Sequence[int],
    *,
    world: int,
    node_size: int | None = None,
    rank: int = 0,
    grads_reduced: bool = False,
) -> list[Traffic]:
    """DDP-aware owner plan traffic of ``rank`` per step (module doc); ``owners[i]``: the owner
    of parameter i (:func:`shardflow.distributed.plan.replicated_plan`)."""
    link = link_of(range(world), node_size or world)
    nbytes = [math.prod(p.shape) * p.elem_bytes for p in params]
    out = []
    if grads_reduced:
        moved = 2 * sum(nbytes) * (world - 1) // world
        out.append(Traffic("DDP all-reduce", link, moved, moved))
    else:  # every gradient to its owner, plus one flag per owned parameter
        flags = [0] * world
        for i, o in enumerate(owners):
            flags[o] += params[i].elem_bytes
        per_owner = [
            flags[r] + sum(b for b, o in zip(nbytes, owners) if o == r) for r in range(world)
        ]
        sent = sum(b for r, b in enumerate(per_owner) if r != rank)
        out.append(Traffic("gradient all-to-all", link, sent, per_owner[rank] * (world - 1)))
    largest = max(
        (sum(b for b, o in zip(nbytes, owners) if o == r) for r in range(world)), default=0
    )
    out.append(Traffic("parameter all-gather", link, largest * (world - 1), largest * (world - 1)))
    return out


def by_link(rows: Sequence[Traffic]) -> dict[str, int]:
    """Bytes sent per link."""
    out: dict[str, int] = {}
    for t in rows:
        out[t.link] = out.get(t.link, 0) + t.sent
    return out


def tile_of(p_shape: Sequence[int], mode: str | None, block: int) -> tuple[int, int] | None:
    """The Newton-Schulz tile of a ≥2-D parameter under ``ortho_mode`` (None: element-wise,
    ⊥Grad, or a 1-D parameter)."""
    if len(p_shape) < 2 or mode not in ("matrix", "block"):
        return None
    return matrix_shape(p_shape) if mode == "matrix" else (block, block)


def units_of(params: Sequence[Param]) -> int:
    """How many Newton-Schulz units the FSDP2 plan has (tiles, or whole matrices)."""
    return sum(len(tile_units(i, p.shape, p.tile)) for i, p in enumerate(params) if p.tile)
