"""What ``load_state_dict`` checks before it loads anything.

``torch.optim.Optimizer.load_state_dict`` checks only the number of param groups and of
parameters per group: another optimizer's state, state of other shapes, or hyperparameters the
constructor would refuse load cleanly and fail (or silently train differently) at the next
``step()``. :func:`state_dict_problem` finds those at load time, with a message naming the
group, parameter or key, what was found and the fix; the base turns it into the same
``ValueError`` on every rank (:meth:`~shardflow.distributed.placement.LocalPlacement.agree`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

_NOT_HYPER = ("params", "param_names")


def state_dict_problem(optimizer: Any, state_dict: Any) -> str | None:
    """Why ``optimizer`` (a ShardFlow optimizer) cannot load ``state_dict``, or None."""
    try:
        _check(optimizer, state_dict)
    except ValueError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a malformed state_dict: reported on every rank
        return f"the state_dict is malformed ({type(exc).__name__}: {exc})"
    return None


def _check(optimizer: Any, state_dict: Any) -> None:
    name = type(optimizer).__name__
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("state"), dict)
        or not isinstance(state_dict.get("param_groups"), list)
    ):
        raise ValueError(
            f"{name}.load_state_dict got a {type(state_dict).__name__} without 'state' and "
            "'param_groups': pass what optimizer.state_dict() returned."
        )
    saved, own = state_dict["param_groups"], optimizer.param_groups
    if len(saved) != len(own):
        raise ValueError(
            f"the state_dict has {len(saved)} param groups, this {name} has {len(own)}: build the "
            "optimizer with the param groups of the one that saved it."
        )
    for g, (theirs, mine) in enumerate(zip(saved, own)):
        _check_group(optimizer, g, theirs, mine)
    ids = [pid for group in saved for pid in group["params"]]
    for (param, pname), pid in zip(_params(own), ids):
        mine = optimizer.state.get(param)
        if mine:
            _check_state(name, pname, mine, state_dict["state"].get(pid))


def _params(groups: list[dict[str, Any]]) -> list[tuple[Tensor, str]]:
    """``(param, name)`` of every parameter, named as its group names it."""
    out = []
    for g, group in enumerate(groups):
        names = group.get("param_names") or []
        for i, p in enumerate(group["params"]):
            out.append((p, repr(names[i]) if i < len(names) else f"{i} of param group {g}"))
    return out


def _check_group(optimizer: Any, g: int, theirs: dict, mine: dict) -> None:
    """Group ``g`` of the state_dict: parameter count, keys, values, orthogonalization."""
    name = type(optimizer).__name__
    if len(theirs["params"]) != len(mine["params"]):
        raise ValueError(
            f"param group {g} of the state_dict has {len(theirs['params'])} parameters, this "
            f"{name}'s has {len(mine['params'])}: build the optimizer over the same parameters."
        )
    keys, own_keys = set(theirs) - set(_NOT_HYPER), set(mine) - set(_NOT_HYPER)
    if keys != own_keys:
        raise ValueError(
            f"param group {g} of the state_dict has keys {name} does not take "
            f"{sorted(keys - own_keys)} and lacks keys it needs {sorted(own_keys - keys)}: it is "
            "another optimizer's state_dict; load it into the optimizer class that saved it."
        )
    candidate = {**theirs, "params": mine["params"]}
    if "param_names" in mine:
        candidate["param_names"] = mine["param_names"]
    try:
        optimizer.check_param_group(candidate)
    except ValueError as exc:
        raise ValueError(f"param group {g} of the state_dict: {exc}") from None
    if optimizer.process_group is None:
        return
    names = mine.get("param_names") or [None] * len(mine["params"])
    for i, (p, pname) in enumerate(zip(mine["params"], names)):
        built, loaded = optimizer._ns_tile(p, mine, pname), optimizer._ns_tile(p, candidate, pname)
        if built != loaded:
            raise ValueError(
                f"param group {g} of the state_dict changes how parameter "
                f"{pname or i!r} is orthogonalized (tiles {loaded}, built with {built}; ortho_mode "
                f"{theirs.get('ortho_mode')!r} vs {mine.get('ortho_mode')!r}): under a "
                "process_group the owner plan is fixed at construction. Build the optimizer "
                "with the state_dict's ortho_mode and block_size, then load it."
            )


def _check_state(name: str, pname: str, mine: dict, theirs: Any) -> None:
    """One parameter's saved state against the state this optimizer keeps for it."""
    if not isinstance(theirs, dict):
        raise ValueError(
            f"the state_dict holds no state for parameter {pname}, for which {name} keeps "
            f"{sorted(mine)}: it is another optimizer's state_dict, or one saved over other "
            "parameters."
        )
    if set(theirs) != set(mine):
        raise ValueError(
            f"the state_dict's state of parameter {pname} holds {sorted(theirs)}, but {name} "
            f"keeps {sorted(mine)} for it: it is another optimizer's state (or one built with "
            "other settings); load it into the optimizer and settings that saved it."
        )
    for key, value in mine.items():
        other = theirs[key]
        if isinstance(value, Tensor) != isinstance(other, Tensor):
            raise ValueError(
                f"state {key!r} of parameter {pname} is a {type(other).__name__} in the "
                f"state_dict but a {type(value).__name__} in {name}."
            )
        if not isinstance(value, Tensor):
            continue
        if tuple(other.shape) != tuple(value.shape):
            raise ValueError(
                f"state {key!r} of parameter {pname} has shape {tuple(other.shape)} in the "
                f"state_dict but {tuple(value.shape)} here: it was saved for a parameter of "
                "another shape (another model, or another rank's shard); load the state_dict "
                "this model and rank saved."
            )
        if other.is_floating_point() != value.is_floating_point():
            raise ValueError(
                f"state {key!r} of parameter {pname} is {other.dtype} in the state_dict but "
                f"{value.dtype} here: it is another optimizer's state (8-bit codes vs floats)."
            )
