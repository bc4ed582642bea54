"""What every rank of a process group must agree on, and the error when they do not.

An optimizer under a process group runs collectives whose shape follows its param groups: the
owner plan is built from each parameter's Newton-Schulz tiles, and each shard or owner applies its
own rank's hyperparameters. Ranks that differ there deadlock (one rank orthogonalizes a matrix the
other does not) or silently mix values (each owner uses its own ``lr``). So the ranks' param-group
hyperparameters and tiles are gathered once — at construction with the parameter signature
(:func:`shardflow.distributed.sharded.make_placement`) and again on ``load_state_dict`` — and any
difference is the same ``ValueError`` on every rank, naming the group, the key and both values.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

PLAIN = (type(None), bool, int, float, str)

GroupSignature = list[dict[str, Any]]
"""Per param group, every key but ``params``/``param_names`` with a comparable value."""


def comparable(value: Any) -> Any:
    """``value`` as something picklable that ``==`` compares by content: tuples and lists
    element-wise, a tensor by dtype, shape and its first 16 values, anything else by ``repr``."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(comparable(v) for v in value)
    if isinstance(value, Tensor):
        flat = value.detach().reshape(-1)[:16].cpu().tolist()
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(flat))
    return repr(value)


def group_signature(param_groups: list[dict[str, Any]]) -> GroupSignature:
    """The hyperparameters of every group (see :data:`GroupSignature`)."""
    return [
        {k: comparable(v) for k, v in g.items() if k not in ("params", "param_names")}
        for g in param_groups
    ]


def groups_difference(signatures: list[GroupSignature]) -> str | None:
    """The first way a rank's hyperparameters differ from rank 0's, or None when all agree."""
    base = signatures[0]
    for r, groups in enumerate(signatures[1:], start=1):
        if len(groups) != len(base):
            return f"rank 0 has {len(base)} param groups and rank {r} has {len(groups)}"
        for g, (mine, theirs) in enumerate(zip(base, groups)):
            for key in sorted(set(mine) | set(theirs), key=str):
                a, b = mine.get(key, _MISSING), theirs.get(key, _MISSING)
                if a != b and not (_is_nan(a) and _is_nan(b)):
                    return f"param group {g} {key!r} is {_show(a)} on rank 0 and {_show(b)} on rank {r}"
    return None


def tiles_difference(tiles: list[list[Any]], names: list[list[str]]) -> str | None:
    """The first parameter whose Newton-Schulz tiles differ from rank 0's, or None (``tiles``
    and ``names``: every rank's, in rank order; a name that differs is shown with both)."""
    for r, theirs in enumerate(tiles[1:], start=1):
        for i, (a, b) in enumerate(zip(tiles[0], theirs)):
            if a != b:
                name = repr(names[0][i])
                if names[r][i] != names[0][i]:
                    name += f" on rank 0, {names[r][i]!r} on rank {r}"
                return (
                    f"parameter {i} ({name}) is orthogonalized {_tile(a)} on rank 0 and "
                    f"{_tile(b)} on rank {r}"
                )
    return None


def disagreement_error(detail: str) -> ValueError:
    """The error raised on every rank for a difference found by the functions above."""
    return ValueError(
        f"the ranks built the optimizer with different settings ({detail}): every rank of the "
        "process group must pass the same hyperparameters and param groups (build them from one "
        "config, not from rank-dependent values), and load the same state_dict."
    )


def raise_if_disagree(gathered: list[tuple[str | None, GroupSignature]]) -> None:
    """``gathered``: every rank's ``(problem, group signature)``. Raise, the same on every rank,
    the first rank's problem, else the first difference between the ranks' signatures."""
    for r, (problem, _) in enumerate(gathered):
        if problem is not None:
            raise ValueError(problem if len(gathered) == 1 else f"rank {r}: {problem}")
    detail = groups_difference([sig for _, sig in gathered])
    if detail is not None:
        raise disagreement_error(detail)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value)


def _tile(tile: Any) -> str:
    return "not at all" if tile is None else f"in {tuple(tile)} tiles"
