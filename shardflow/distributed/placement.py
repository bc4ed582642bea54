"""Where an optimizer's tensors live, and the reduction points its update rule may call.

An update rule (``shardflow.optim``) is written against local tensors and touches the rest of the
world only through a :class:`Placement` (DESIGN.md, "reduction points"):

- :meth:`Placement.sum_over_shards` — sum a batch of per-parameter partial results over the ranks
  that hold pieces of the same parameters (⊥Grad dot products, factored column sums, norms).
- :meth:`Placement.sum_over_model` — sum over ranks holding disjoint parts of the model (the
  global gradient norm for clipping).
- :meth:`Placement.orthogonalize` — Newton-Schulz on whole matrices, wherever their pieces are.

:class:`LocalPlacement` is the single-process placement: every sum is the identity and every
matrix is whole. The DDP-aware and FSDP2-aware placements subclass it
(:mod:`shardflow.distributed.sharded`).

What a placement says about a parameter, for the optimizer base and for checkpoints:

- :meth:`Placement.owns` — whether this rank runs the update rule on (its rows of) it;
- :meth:`Placement.local` — the rows of a parameter, gradient or row-layout state tensor that this
  rank holds, as a plain tensor (0 rows where it holds none);
- :meth:`Placement.row_range` — which rows of the parameter those are, ``(0, 0)`` when none;
- :meth:`Placement.global_shape` — the parameter's full shape.

State is created on every rank for every parameter (0-row tensors where a rank holds no rows), so
``state_dict()`` keys are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from shardflow.distributed import comm
from shardflow.distributed.agreement import group_signature, raise_if_disagree
from shardflow.ops.orthogonalize import (
    block_newton_schulz,
    block_rms_scale,
    newton_schulz_many,
    rms_scale,
)

NSTile = Callable[[Tensor, dict, "str | None"], "tuple[int, int] | None"]
"""``ns_tile(param, group, name)``: None when the parameter is not orthogonalized, else the shape
of its Newton-Schulz tiles (its whole ``(out, rest)`` matrix, or ``(b, b)`` blocks). The owner
plan balances this cost."""


class LocalPlacement:
    """One process: all tensors local and whole, no collectives."""

    world_size: int = 1
    rank: int = 0
    group: Any = None
    """The process group the collectives run over (None: one process)."""

    def local(self, tensor: Tensor) -> Tensor:
        """The part of ``tensor`` (a parameter, gradient or state) this rank holds."""
        return tensor

    def global_shape(self, param: Tensor) -> torch.Size:
        """The parameter's full shape."""
        return param.shape

    def row_range(self, param: Tensor) -> tuple[int, int]:
        """Rows ``[start, stop)`` of the parameter whose state this rank keeps; ``(0, 0)``: none."""
        return (0, param.shape[0] if param.ndim else 1)

    def owns(self, param: Tensor) -> bool:
        """Whether this rank computes (part of) the update of ``param``."""
        return True

    def grad(self, param: Tensor) -> Tensor | None:
        """The gradient the update uses (a placement may have reduced it to this rank)."""
        return param.grad

    def wrap_state(self, param: Tensor, value: Any, layout: str) -> Any:
        """The state value as kept in ``optimizer.state`` (FSDP2: row-layout tensors as DTensors)."""
        return value

    def state_view(self, state: dict) -> dict:
        """The state as an update rule sees it: plain local tensors (here: ``state`` itself)."""
        return state

    def sum_over_shards(self, values: Tensor) -> Tensor:
        """Sum per-parameter partial results over the ranks sharing those parameters."""
        return values

    def sum_over_model(self, values: Tensor) -> Tensor:
        """Sum partial results over the ranks holding disjoint parts of the model."""
        return values

    def orthogonalize(
        self,
        params: Sequence[Tensor],
        mats: Sequence[Tensor],
        *,
        block_size: int | None,
        ns: dict,
    ) -> list[Tensor]:
        """Orthogonalize each ``(out, rest)`` matrix and give it an RMS of about 1.

        ``mats[i]`` is this rank's piece of the matrix of ``params[i]``; the result has the same
        shape. Whole matrices are scaled by ``√max(m, n)``, tiles by ``√max`` of the tile.
        """
        if block_size is None:
            out = newton_schulz_many(mats, **ns)
            for o in out:
                o.mul_(rms_scale(o.shape))
            return out
        return [
            block_newton_schulz(m, block_size, **ns).mul_(block_rms_scale(m, block_size))
            for m in mats
        ]

    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Called at the start of ``step``: make gradients of owned parameters ready."""

    def before_bucket(self, params: Sequence[Tensor]) -> None:
        """Gradient release: called before a bucket's update (``params``, the same on every
        rank): make those gradients ready on their owners (the update reads :meth:`grad`)."""

    def after_bucket(self) -> None:
        """Gradient release: called after a bucket's update."""

    def after_update(self, optimizer: torch.optim.Optimizer, updated: bool = True) -> None:
        """Called at the end of ``step`` (``updated=False`` when it was skipped, on every rank
        alike): make updated parameters visible where they are needed."""

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (``[obj]`` for one process); for checks, never
        per step (it pickles)."""
        if self.group is None:
            return [obj]
        return comm.all_gather_object(obj, self.group, self.world_size)

    def agree(self, problem: str | None, param_groups: list[dict]) -> None:
        """Raise the same ``ValueError`` on every rank when any rank found ``problem`` (a local
        check's message) or when the ranks' ``param_groups`` hold different hyperparameters
        (:mod:`shardflow.distributed.agreement`); one ``all_gather_object``."""
        raise_if_disagree(self.gather_object((problem, group_signature(param_groups))))

    def describe(self) -> str:
        """A human-readable summary of what this rank holds."""
        return "single process: every parameter local"


def plan_inputs(
    param_groups: list[dict], ns_tile: NSTile | None = None
) -> tuple[list[Tensor], list[str], list[tuple[int, int] | None]]:
    """The parameters of ``param_groups`` in order, their names and their Newton-Schulz tiles:
    what an owner plan is built from (:func:`shardflow.distributed.plan.replicated_plan`,
    :func:`~shardflow.distributed.plan.sharded_plan`). A parameter without a ``param_names``
    entry is named ``"group G param I"``; ``ns_tile=None``: nothing is orthogonalized."""
    params, names, tiles = [], [], []
    for gi, g in enumerate(param_groups):
        gnames = g.get("param_names") or [None] * len(g["params"])
        for p, name in zip(g["params"], gnames):
            params.append(p)
            names.append(name or f"group {gi} param {len(params) - 1}")
            tiles.append(ns_tile(p, g, name) if ns_tile is not None else None)
    return params, names, tiles


def resolve_placement(
    param_groups: list[dict],
    process_group,
    ns_tile: NSTile | None = None,
    *,
    grads_reduced: bool = False,
) -> LocalPlacement:
    """Pick the placement for these parameters and ``process_group`` (once, at construction).

    ``None``: one process. A ProcessGroup or 1-D DeviceMesh: plain parameters → DDP-aware,
    DTensors sharded on dim 0 → FSDP2-aware (:func:`shardflow.distributed.sharded.make_placement`).

    ``grads_reduced=True`` says the gradients are already averaged over ``process_group``'s ranks
    (a DDP-wrapped model), so the DDP-aware placement sends none itself. It is refused where it
    means nothing: with ``process_group=None`` (one process), and with FSDP2 parameters (FSDP2
    always reduce-scatters the gradients to their shards; the placement never reduces them).
    """
    if not isinstance(grads_reduced, bool):
        raise ValueError(
            f"grads_reduced={grads_reduced!r} is invalid: pass True (a DDP-wrapped model: the "
            "gradients are already averaged over the ranks) or False."
        )
    if process_group is None:
        if grads_reduced:
            raise ValueError(
                "grads_reduced=True was given with process_group=None: it says a DDP wrapper has "
                "already averaged the gradients over process_group's ranks, and one process has "
                "nothing to average. Pass the process group DDP uses (e.g. "
                "torch.distributed.group.WORLD), or leave grads_reduced=False."
            )
        return LocalPlacement()
    from shardflow.distributed import sharded  # noqa: PLC0415 - heavy import only when needed

    return sharded.make_placement(param_groups, process_group, ns_tile, grads_reduced=grads_reduced)
