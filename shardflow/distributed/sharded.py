"""The sharded placements: DDP-aware (replicated parameters) and FSDP2-aware (``Shard(0)``).

Which one is decided once, at construction, from the parameters (:func:`make_placement`): plain
tensors and a process group → :class:`ReplicatedPlacement`; DTensors sharded on dim 0 over a 1-D
mesh (``torch.distributed.fsdp.fully_shard``) → :class:`ShardedPlacement`; DTensors placed
``(Replicate(), Shard(0))`` on a 2-D ``("replicate", "shard")`` mesh (HSDP: ``fully_shard(module,
mesh=mesh2d)``, with ``process_group=mesh2d``) → :class:`ShardedPlacement` over the shard
dimension's group. The update rules do
not change: they see local tensors and call the reduction points of
:class:`~shardflow.distributed.placement.LocalPlacement`.

**DDP-aware (ZeRO-1/2 style).** An :class:`~shardflow.distributed.plan.OwnerPlan` gives every
parameter one owner rank (balanced by Newton-Schulz cost, then by elements). The owner keeps its
state and computes its whole update, Newton-Schulz included; every other rank keeps 0-row
placeholders (same state keys everywhere). Per step:

- gradients: with ``grads_reduced=False`` (the default, correct with or without a DDP wrapper)
  one all-to-all per gradient dtype sends each owner its parameters' gradients from every rank
  and the owner averages them — a reduce-scatter: ``P·(W−1)/W`` elements out per rank, half of an
  all-reduce. With a DDP-wrapped model pass ``grads_reduced=True`` to the optimizer (the
  gradients are already averaged everywhere) and this traffic disappears;
- one all-reduce of one scalar (global gradient norm: clipping and the NaN/inf skip);
- one all-gather of the updated parameters, byte-packed so that every dtype travels in the same
  call (``P·(W−1)/W`` elements in per rank), padded to the largest owner's bytes.

**FSDP2-aware.** Every rank updates its own rows of every parameter: element-wise state lives on
the local shard (as DTensors with the parameter's placement, so ``torch.distributed.checkpoint``
sees sharded state), and Newton-Schulz runs on owners: the plan's units are whole matrices
(``ortho_mode="matrix"``) or single tiles (``"block"``: the tile is the unit, so the world size
may exceed the number of matrices). :meth:`ShardedPlacement.orthogonalize` sends every rank's
rows of every unit to its owner in one all-to-all, the owners run batched Newton-Schulz, and one
all-to-all brings the rows back: per rank ``≈ 2·P/W·(W−1)/W`` elements sent and as many received
(P = orthogonalized elements), in ``wire_dtype`` (bf16 by default). Splits are exact per rank, so
uneven and empty shards need no padding. Row-wise ⊥Grad needs nothing; flattened ⊥Grad, RMS
normalization, trust region and dynamic momentum are one batched all-reduce each
(:meth:`sum_over_shards`); clipping is one all-reduce of one scalar.

**HSDP.** The placement is the FSDP2-aware one inside the shard dimension: the owner plan, its
all-to-alls and every sum run in the shard group only, so nothing crosses replicas (nodes) but
FSDP2's own gradient all-reduce. Each replica computes the same plan from the same shapes and
gets the same gradient shards, so every replica's results are the same bits without any extra
traffic; :func:`shardflow.distributed.replicas.check_replicas` verifies it on demand.

Nothing here runs between steps: gradient accumulation (several backward passes, one ``step``)
keeps every collective and every Newton-Schulz at the accumulation boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardflow.distributed import comm
from shardflow.distributed.agreement import (
    disagreement_error,
    group_signature,
    groups_difference,
    tiles_difference,
)
from shardflow.distributed.placement import LocalPlacement, NSTile, plan_inputs
from shardflow.distributed.plan import (
    Unit,
    assign,
    matrix_shape,
    replicated_plan,
    sharded_plan,
    tile_units,
)
from shardflow.ops.orthogonalize import newton_schulz_many, rms_scale


def make_placement(
    param_groups: list[dict],
    process_group: Any,
    ns_tile: NSTile | None = None,
    *,
    grads_reduced: bool = False,
) -> LocalPlacement:
    """The placement for these param groups over ``process_group`` (see the module docstring).

    ``ns_tile(param, group, name)`` says how a parameter is orthogonalized: ``None`` (not), or the
    shape of its Newton-Schulz tiles (the whole ``(out, rest)`` matrix, or ``(b, b)`` blocks).
    ``grads_reduced``: the gradients are already averaged (DDP-wrapped model; DDP-aware only).
    Raises the same ``ValueError`` on every rank for unsupported input and for ranks that differ
    (one ``all_gather_object`` of every rank's local findings, parameter signature, param-group
    hyperparameters and Newton-Schulz tiles: :mod:`~shardflow.distributed.agreement`), never
    leaving a rank waiting.
    """
    group, mesh, replicate = _resolve_group(process_group)
    world = dist.get_world_size(group)
    params, names, tiles = plan_inputs(param_groups, ns_tile)
    problem = _local_problem(params, names, group, mesh)
    signature = [_signature(p) for p in params]
    local_rows = [_local_rows(p) for p in params]
    hyper = group_signature(param_groups)
    gathered = comm.all_gather_object(
        (problem, signature, local_rows, hyper, tiles, names), group, world
    )
    if replicate is not None:  # every replica's findings reach every rank (HSDP)
        everywhere = comm.all_gather_object(gathered, replicate, dist.get_world_size(replicate))
        _raise_if_any([entry for shard_group in everywhere for entry in shard_group], names)
    _raise_if_any(gathered, names)
    rows = [[gathered[r][2][i] for r in range(world)] for i in range(len(params))]
    if params and isinstance(params[0], DTensor):
        if grads_reduced:  # the same on every rank: the ranks' parameter types agree (above)
            raise ValueError(
                "grads_reduced=True was given with FSDP2 (DTensor) parameters, where it means "
                "nothing: fully_shard always reduce-scatters the gradients to their shards and "
                "the optimizer never reduces them again. Leave grads_reduced=False (it is only "
                "for plain parameters of a DDP-wrapped model)."
            )
        _check_row_counts(params, names, rows)
        mesh = params[0].device_mesh
        return ShardedPlacement(params, names, tiles, rows, group, mesh, replicate=replicate)
    return ReplicatedPlacement(params, names, tiles, group, grads_reduced=grads_reduced)


# -- checks ---------------------------------------------------------------------------------


def _resolve_group(process_group: Any) -> tuple[Any, DeviceMesh | None, Any]:
    """``(shard group, mesh, replicate group)``: the group the owner plan and its collectives
    run in, the mesh given (None for a ProcessGroup) and, for a 2-D HSDP mesh, the group across
    its replicas (None otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"process_group={process_group!r} was given but torch.distributed is not initialized: "
            "call torch.distributed.init_process_group first (torchrun does it for you), or pass "
            "process_group=None for one process."
        )
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim == 2:
            return process_group.get_group(1), process_group, process_group.get_group(0)
        if process_group.ndim != 1:
            raise ValueError(
                f"process_group is a {process_group.ndim}-D DeviceMesh "
                f"(shape {tuple(process_group.shape)}, dims {process_group.mesh_dim_names}): pass "
                "a 1-D mesh (FSDP2) or the 2-D (replicate, shard) mesh given to fully_shard for "
                "HSDP; for other parallelisms pass the (replicate, shard) sub-mesh, e.g. "
                "mesh['dp_replicate', 'dp_shard']."
            )
        return process_group.get_group(), process_group, None
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(_NOT_A_MEMBER.format(rank=dist.get_rank()))
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            f"process_group={process_group!r} is invalid: pass a torch.distributed ProcessGroup "
            "(e.g. torch.distributed.group.WORLD), a 1-D DeviceMesh, a 2-D (replicate, shard) "
            "DeviceMesh for HSDP, or None for one process."
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(_NOT_A_MEMBER.format(rank=dist.get_rank()))
    return process_group, None, None


_NOT_A_MEMBER = (
    "process_group does not contain this rank (global rank {rank}): build the optimizer only on "
    "the ranks of the group, or pass a group this rank belongs to (e.g. torch.distributed.group."
    "WORLD)."
)


def _local_problem(
    params: list[Tensor], names: list[str], group, mesh: DeviceMesh | None
) -> str | None:
    """What this rank finds unsupported in its own parameters, or None."""
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded) and not all(sharded):
        plain = names[sharded.index(False)]
        dt = names[sharded.index(True)]
        return (
            f"the parameters mix DTensors ({dt!r}) and plain tensors ({plain!r}): shard every "
            "parameter with fully_shard (apply it to the root module too) or none of them "
            "(DDP-aware mode)."
        )
    hsdp = mesh is not None and mesh.ndim == 2
    if hsdp and params and not any(sharded):
        return (
            f"process_group is a 2-D DeviceMesh {tuple(mesh.shape)} (HSDP) but the parameters "
            f"are plain tensors ({names[0]!r}): a 2-D mesh is for parameters sharded with "
            "fully_shard(module, mesh=mesh) (placements (Replicate(), Shard(0))); for replicated "
            "parameters pass a process group (e.g. torch.distributed.group.WORLD)."
        )
    for p, name in zip(params, names):
        if isinstance(p, DTensor):
            found = _dtensor_problem(p, name, group, mesh)
            if found is not None:
                return found
        elif not p.is_contiguous():
            return (
                f"parameter {name!r} is not contiguous: the DDP-aware mode all-gathers parameters "
                "in place; make it contiguous (param.data = param.data.contiguous())."
            )
    return None


def _dtensor_problem(p: DTensor, name: str, group, mesh: DeviceMesh | None) -> str | None:
    """What is wrong with a DTensor parameter for this process group or mesh, or None.

    1-D: placements ``(Shard(0),)`` over the group's ranks. 2-D (HSDP, given as the mesh):
    placements ``(Replicate(), Shard(0))`` on a mesh whose shard and replicate groups are the
    given mesh's (``fully_shard(module, mesh=mesh)`` with that very mesh)."""
    pmesh, placements = p.device_mesh, tuple(p.placements)
    if mesh is not None and mesh.ndim == 2:
        if pmesh.ndim != 2 or placements != (Replicate(), Shard(0)):
            return (
                f"parameter {name!r} is a DTensor on a {pmesh.ndim}-D mesh "
                f"{tuple(pmesh.shape)} with placements {placements}, but process_group is the 2-D "
                f"mesh {tuple(mesh.shape)} {mesh.mesh_dim_names}: its shard dimension (dim 1) must "
                "be the one the parameters are sharded over, with placements (Replicate(), "
                "Shard(0)) (fully_shard(module, mesh=mesh) with this mesh). Pass the mesh the "
                "parameters were sharded with."
            )
        for dim, what in ((1, "shard"), (0, "replicate")):
            mine = dist.get_process_group_ranks(pmesh.get_group(dim))
            given = dist.get_process_group_ranks(mesh.get_group(dim))
            if mine != given:
                return (
                    f"parameter {name!r} is sharded over a 2-D mesh whose {what} dimension holds "
                    f"ranks {mine} here, but the 2-D process_group's {what} dimension holds "
                    f"ranks {given}: pass the mesh the parameters were sharded with "
                    "(fully_shard(module, mesh=mesh); process_group=mesh)."
                )
        return None
    if pmesh.ndim != 1:
        return (
            f"parameter {name!r} is a DTensor on a {pmesh.ndim}-D mesh {tuple(pmesh.shape)} "
            f"{pmesh.mesh_dim_names} (HSDP) but process_group is 1-D: pass that 2-D mesh itself "
            "(process_group=mesh); the owner plan then runs inside its shard dimension."
        )
    if placements != (Shard(0),):
        return (
            f"parameter {name!r} is a DTensor with placements {placements}: only "
            "(Shard(0),) is supported (FSDP2 fully_shard's default). Shard parameters on "
            "dim 0, or pass plain tensors (DDP-aware mode)."
        )
    group_ranks = dist.get_process_group_ranks(group)
    if dist.get_process_group_ranks(pmesh.get_group()) != group_ranks:
        return (
            f"parameter {name!r} is sharded over ranks "
            f"{dist.get_process_group_ranks(pmesh.get_group())} but process_group "
            f"holds ranks {group_ranks}: pass the mesh the parameters are sharded over "
            "(process_group=mesh)."
        )
    return None


def _signature(p: Tensor) -> tuple:
    return (tuple(p.shape), str(p.dtype), type(p).__name__)


def _local_rows(p: Tensor) -> int:
    if isinstance(p, DTensor):
        local = p.to_local()
        return int(local.shape[0]) if local.ndim else 1
    return int(p.shape[0]) if p.ndim else 1


def _raise_if_any(gathered: list, names: list[str]) -> None:
    """Raise on every rank what any rank found, or where the ranks' parameter lists, param-group
    hyperparameters or Newton-Schulz tiles differ."""
    for r, (problem, *_) in enumerate(gathered):
        if problem is not None:
            raise ValueError(f"rank {r}: {problem}")
    base = gathered[0][1]
    for r, (_, sig, *_) in enumerate(gathered[1:], start=1):
        if sig == base:
            continue
        if len(sig) != len(base):
            detail = f"rank 0 has {len(base)} parameters, rank {r} has {len(sig)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(base, sig)) if a != b)
            detail = (
                f"parameter {i} ({names[i]!r}) is {base[i][0]} {base[i][1]} {base[i][2]} on rank 0 "
                f"and {sig[i][0]} {sig[i][1]} {sig[i][2]} on rank {r}"
            )
        raise ValueError(
            f"the ranks built different parameter lists ({detail}): every rank must pass the same "
            "parameters, in the same order, with the same shapes and dtypes (build the model and "
            "the param groups the same way on every rank)."
        )
    detail = groups_difference([g[3] for g in gathered]) or tiles_difference(
        [g[4] for g in gathered], [g[5] for g in gathered]
    )
    if detail is not None:
        raise disagreement_error(detail)


def _check_row_counts(params: list[Tensor], names: list[str], rows: list[list[int]]) -> None:
    for p, name, counts in zip(params, names, rows):
        total = int(p.shape[0]) if p.ndim else 1
        if sum(counts) != total:
            raise ValueError(
                f"parameter {name!r}: the ranks hold {counts} rows, which do not add up to its "
                f"{total} rows; only Shard(0) of the whole parameter is supported."
            )


# -- DDP-aware --------------------------------------------------------------------------------


class ReplicatedPlacement(LocalPlacement):
    """Replicated parameters: each rank owns whole parameters, keeps their state, updates them,
    and the new values are all-gathered (see the module docstring)."""

    def __init__(
        self,
        params: list[Tensor],
        names: list[str],
        tiles: list[tuple[int, int] | None],
        group,
        *,
        grads_reduced: bool = False,
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params = params
        self.names = names
        self.grads_reduced = grads_reduced
        """True when the gradients are already averaged over the ranks (a DDP-wrapped model)."""
        self.plan = replicated_plan([p.shape for p in params], tiles, self.world_size)
        self.owner = self.plan.owners
        self._index = {id(p): i for i, p in enumerate(params)}
        self._owned_by = [
            [i for i, o in enumerate(self.owner) if o == r] for r in range(self.world_size)
        ]
        self._nbytes = [p.numel() * p.element_size() for p in params]
        self._max_bytes = max(
            (sum(self._nbytes[i] for i in idx) for idx in self._owned_by), default=0
        )
        self._device = params[0].device if params else torch.device("cpu")
        self._reduced: dict[int, Tensor | None] | None = None

    # what this rank holds
    def _i(self, param: Tensor) -> int:
        return self._index[id(param)]

    def owns(self, param: Tensor) -> bool:
        return self.owner[self._i(param)] == self.rank

    def local(self, tensor: Tensor) -> Tensor:
        """A parameter this rank does not own has no local rows (a 0-row view); else itself."""
        i = self._index.get(id(tensor))
        if i is None or self.owner[i] == self.rank:
            return tensor
        return _no_rows(tensor)

    def row_range(self, param: Tensor) -> tuple[int, int]:
        rows = param.shape[0] if param.ndim else 1
        return (0, rows) if self.owns(param) else (0, 0)

    def grad(self, param: Tensor) -> Tensor | None:
        if self._reduced is None:
            return param.grad
        return self._reduced.get(self._i(param))

    # reduction points: an owned parameter is whole here
    def sum_over_model(self, values: Tensor) -> Tensor:
        return comm.all_reduce_sum(values, self.group, self._device)

    # the step
    def before_update(self, optimizer) -> None:
        self._reduced = None if self.grads_reduced else self._reduce_grads()

    def after_update(self, optimizer, updated: bool = True) -> None:
        self._reduced = None
        if updated:
            self._gather_params()

    def before_bucket(self, params: Sequence[Tensor]) -> None:
        """Gradient release: average this bucket's gradients on their owners (one all-to-all
        per dtype); the all-gather of the weights waits for ``after_update`` (the step)."""
        if not self.grads_reduced:
            self._reduced = self._reduce_grads({self._i(p) for p in params})

    def after_bucket(self) -> None:
        self._reduced = None

    def _reduce_grads(self, only: set[int] | None = None) -> dict[int, Tensor | None]:
        """Average every gradient (of ``only``: parameter indices) on its owner: one
        all-to-all per gradient dtype.

        Owner r's chunk of the send buffer holds the gradients of r's parameters, then one flag
        per parameter (1 where this rank has a gradient): a parameter no rank has a gradient for
        stays without one. A missing gradient counts as zeros in the average.
        """
        out: dict[int, Tensor | None] = {}
        w = self.world_size
        chosen = range(len(self.params)) if only is None else sorted(only)
        for dtype in sorted({self.params[i].dtype for i in chosen}, key=str):
            chunks, splits = [], []
            for r in range(w):
                idx = [i for i in self._owned_by[r] if _picked(self.params[i], i, dtype, only)]
                parts = [_flat_grad(self.params[i]) for i in idx]
                flags = [1.0 if self.params[i].grad is not None else 0.0 for i in idx]
                parts.append(torch.tensor(flags, dtype=dtype, device=self._device))
                chunks.extend(parts)
                splits.append(sum(t.numel() for t in parts))
            mine = splits[self.rank]
            recv = comm.all_to_all(torch.cat(chunks), splits, [mine] * w, self.group)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            total = recv.view(w, mine).to(acc).sum(0).div_(w)
            idx = [i for i in self._owned_by[self.rank] if _picked(self.params[i], i, dtype, only)]
            flags = total[-len(idx) :] if idx else total[:0]
            offset = 0
            for k, i in enumerate(idx):
                p = self.params[i]
                g = total[offset : offset + p.numel()].view(p.shape)
                out[i] = g if float(flags[k]) > 0 else None
                offset += p.numel()
        return out

    def _gather_params(self) -> None:
        """Every owner's updated parameters to every rank: one byte-packed all-gather."""
        mine = [self.params[i] for i in self._owned_by[self.rank]]
        chunk = (
            torch.cat([_bytes_view(p) for p in mine])
            if mine
            else torch.empty(0, dtype=torch.uint8, device=self._device)
        )
        rows = comm.all_gather_bytes(chunk, self._max_bytes, self.world_size, self.group)
        for r, idx in enumerate(self._owned_by):
            if r == self.rank:
                continue
            offset = 0
            for i in idx:
                _bytes_view(self.params[i]).copy_(rows[r, offset : offset + self._nbytes[i]])
                offset += self._nbytes[i]

    def describe(self) -> str:
        mode = (
            "gradients already reduced (DDP-wrapped)"
            if self.grads_reduced
            else ("the optimizer reduces gradients to their owners")
        )
        return (
            f"DDP-aware owner plan over {self.world_size} ranks ({mode}); this is rank "
            f"{self.rank}\n{self.plan.describe('params', dict(enumerate(self.names)))}"
        )


def _picked(p: Tensor, i: int, dtype: torch.dtype, only: set[int] | None) -> bool:
    return p.dtype == dtype and (only is None or i in only)


def _no_rows(t: Tensor) -> Tensor:
    return t.reshape(1)[:0] if t.ndim == 0 else t[:0]


def _flat_grad(p: Tensor) -> Tensor:
    if p.grad is None:
        return torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
    return p.grad.reshape(-1)


def _bytes_view(p: Tensor) -> Tensor:
    """The parameter's storage as a flat uint8 tensor (writes go to the parameter)."""
    return p.detach().reshape(-1).view(torch.uint8)


# -- FSDP2-aware ------------------------------------------------------------------------------


class ShardedPlacement(LocalPlacement):
    """Parameters are DTensors sharded on dim 0: state on local rows, Newton-Schulz on owners."""

    def __init__(
        self,
        params: list[Tensor],
        names: list[str],
        tiles: list[tuple[int, int] | None],
        rows: list[list[int]],
        group,
        mesh: DeviceMesh,
        *,
        replicate=None,
    ) -> None:
        self.group = group
        """The shard group: the owner plan and every collective of a step run inside it."""
        self.mesh = mesh
        self.replicate_group = replicate
        """HSDP: the group of this rank's replicas (same rows, same results); None on 1-D."""
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params = params
        self.names = names
        self.wire_dtype: torch.dtype | None = torch.bfloat16
        """Dtype of the matrices on the wire to and from their owners (None: their own dtype)."""
        self.rows = rows
        """``rows[i][r]``: how many rows of parameter i rank r holds (in rank order)."""
        self.offsets = [[sum(c[:r]) for r in range(len(c) + 1)] for c in rows]
        self._index = {id(p): i for i, p in enumerate(params)}
        self.plan = sharded_plan([p.shape for p in params], tiles, self.world_size)
        self._device = params[0].device if params else torch.device("cpu")
        self._fallback: dict[tuple, list[int]] = {}

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def row_range(self, param: Tensor) -> tuple[int, int]:
        i, r = self._index[id(param)], self.rank
        return (self.offsets[i][r], self.offsets[i][r + 1])

    def sum_over_shards(self, values: Tensor) -> Tensor:
        return comm.all_reduce_sum(values, self.group, self._device)

    def sum_over_model(self, values: Tensor) -> Tensor:
        return comm.all_reduce_sum(values, self.group, self._device)

    def wrap_state(self, param: Tensor, value: Any, layout: str) -> Any:
        """Row-layout state becomes a DTensor with the parameter's placement (uneven shards too)."""
        if layout != "rows" or not isinstance(value, Tensor) or value.ndim == 0:
            return value
        shape = (self._rows_total(param), *value.shape[1:])
        return DTensor.from_local(
            value,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=torch.Size(shape),
            stride=_contiguous_stride(shape),
        )

    def state_view(self, state: dict) -> dict:
        return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}

    def _rows_total(self, param: Tensor) -> int:
        return self.offsets[self._index[id(param)]][-1]

    # Newton-Schulz on owners
    def orthogonalize(
        self,
        params: Sequence[Tensor],
        mats: Sequence[Tensor],
        *,
        block_size: int | None,
        ns: dict,
    ) -> list[Tensor]:
        """Send every unit's rows to its owner, orthogonalize there, send the rows back.

        Two all-to-all calls in all, whatever the number of matrices. Every rank must call this
        with the same parameters in the same order (the update rule runs on every parameter on
        every rank, empty shards included).
        """
        idx = [self._index[id(p)] for p in params]
        units = [
            u
            for i in idx
            for u in tile_units(i, self.params[i].shape, _tile(self.params[i].shape, block_size))
        ]
        owners = self._owners(units, block_size)
        if not mats:
            return []
        w, me = self.world_size, self.rank
        wire = self.wire_dtype or mats[0].dtype
        pos = {i: k for k, i in enumerate(idx)}
        # round 1: my rows of every unit, to its owner, in rank order then unit order
        send_parts, send_splits = [], [0] * w
        for r in range(w):
            for u, o in zip(units, owners):
                if o != r:
                    continue
                piece = self._my_piece(mats[pos[u.index]], u)
                send_parts.append(piece)
                send_splits[r] += piece.numel()
        mine = [u for u, o in zip(units, owners) if o == me]
        recv_splits = [sum(self._overlap(u, s) * _width(u) for u in mine) for s in range(w)]
        send = _cat(send_parts, wire, self._device)
        recv = comm.all_to_all(send, send_splits, recv_splits, self.group)
        # on the owner: whole tiles, batched Newton-Schulz, RMS 1
        compute = mats[0].dtype
        pieces: list[list[Tensor]] = [[] for _ in mine]
        offset = 0
        for s in range(w):
            for k, u in enumerate(mine):
                n = self._overlap(u, s) * _width(u)
                pieces[k].append(recv[offset : offset + n].view(-1, _width(u)))
                offset += n
        whole = [torch.cat(p).to(compute) for p in pieces]
        done = newton_schulz_many(whole, **ns) if whole else []
        for o in done:
            o.mul_(rms_scale(o.shape))
        # round 2: every rank's rows back, in the reverse layout
        back_parts = []
        for s in range(w):
            for k, u in enumerate(mine):
                lo, hi = self._overlap_range(u, s)
                back_parts.append(done[k][lo - u.rows[0] : hi - u.rows[0]])
        back = comm.all_to_all(
            _cat(back_parts, wire, self._device), recv_splits, send_splits, self.group
        )
        out = [torch.empty_like(m) for m in mats]
        offset = 0
        for r in range(w):
            for u, o in zip(units, owners):
                if o != r:
                    continue
                lo, hi = self._overlap_range(u, me)
                n = (hi - lo) * _width(u)
                base = self.offsets[u.index][me]
                target = out[pos[u.index]][lo - base : hi - base, u.cols[0] : u.cols[1]]
                target.copy_(back[offset : offset + n].view(hi - lo, _width(u)))
                offset += n
        return out

    def _owners(self, units: list[Unit], block_size: int | None) -> list[int]:
        """The plan's owner of each unit; units the plan does not know (the group's ``ortho_mode``
        or ``block_size`` changed after construction) get a deterministic plan of their own."""
        known = [self.plan.owner(u.index, u.rows, u.cols) for u in units]
        if all(o is not None for o in known):
            return known  # type: ignore[return-value]
        key = (tuple(u.index for u in units), block_size)
        if key not in self._fallback:
            self._fallback[key] = assign(units, self.world_size)
        return self._fallback[key]

    def _overlap_range(self, u: Unit, rank: int) -> tuple[int, int]:
        lo = max(u.rows[0], self.offsets[u.index][rank])
        hi = min(u.rows[1], self.offsets[u.index][rank + 1])
        return (lo, max(lo, hi))

    def _overlap(self, u: Unit, rank: int) -> int:
        lo, hi = self._overlap_range(u, rank)
        return hi - lo

    def _my_piece(self, mat: Tensor, u: Unit) -> Tensor:
        lo, hi = self._overlap_range(u, self.rank)
        base = self.offsets[u.index][self.rank]
        return mat[lo - base : hi - base, u.cols[0] : u.cols[1]]

    def describe(self) -> str:
        if self.replicate_group is not None:
            replicas = dist.get_world_size(self.replicate_group)
            return (
                f"HSDP-aware: {replicas} replicas x {self.world_size} shards; state on local rows, "
                f"Newton-Schulz owner plan inside the shard group (wire {self.wire_dtype}); this "
                f"is shard rank {self.rank}\n"
                f"{self.plan.describe('NS units', dict(enumerate(self.names)))}"
            )
        return (
            f"FSDP2-aware: state on local rows over {self.world_size} ranks; Newton-Schulz owner "
            f"plan (wire {self.wire_dtype}); this is rank {self.rank}\n"
            f"{self.plan.describe('NS units', dict(enumerate(self.names)))}"
        )


def _tile(shape: Sequence[int], block_size: int | None) -> tuple[int, int]:
    return matrix_shape(shape) if block_size is None else (block_size, block_size)


def _width(u: Unit) -> int:
    return u.cols[1] - u.cols[0]


def _cat(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One flat ``dtype`` buffer holding ``parts`` in order (each copied and cast once)."""
    out = torch.empty(sum(p.numel() for p in parts), dtype=dtype, device=device)
    offset = 0
    for p in parts:
        out[offset : offset + p.numel()].view(p.shape).copy_(p)
        offset += p.numel()
    return out


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))
