"""What this rank holds: every model and optimizer tensor as a row slice of a named global tensor.

The rule, the same for every placement and every optimizer:

- **Names.** A parameter is named by its model FQN (``model.named_parameters()``, with wrapper
  prefixes — DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, FSDP1/activation-checkpoint
  wrappers — removed, so the same model has the same names under any wrapper); without a model,
  by the optimizer's ``param_names`` (built from named parameters), else by position
  ``param_groups.<g>.<i>``. Never by ``id()``.
- **Model tensors** (``model.state_dict()``): a DTensor sharded ``Shard(0)`` (FSDP2) holds rows
  ``[offset, offset + local_rows)``; a plain tensor, or a ``Replicate`` DTensor, holds all rows.
  Identical copies on several ranks (DDP, HSDP) are written once.
- **Optimizer state** of a parameter comes from the ranks that own it (``placement.owns(p)``
  and ``placement.row_range(p)`` not None); non-owners' placeholder state is never written.
  Each state key reshards as its optimizer's ``state_layout`` declares: ``"rows"`` — dim 0 is
  the parameter's rows ``row_range(p)``, the global shape is ``(global_rows, *local.shape[1:])``
  (any trailing dims: a packed sign ``(rows, ⌈cols/8⌉)``, 8-bit codes, block scales
  ``(rows, nblocks)``, low-rank moments ``(rows, r)``); ``"replicated"`` — the whole tensor,
  identical wherever the state lives (step counters, seeds, column factors after their
  all-reduce). A 0-d tensor is whole whatever its layout. Non-tensor values go to the index as
  JSON. An optimizer without ``state_layout`` (a ``torch.optim`` one) gets ``"rows"`` for state
  shaped like the local parameter and ``"replicated"`` for the rest; state kept as a DTensor
  (``torch.optim`` on FSDP2 parameters) is sliced by its own placement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shardflow.checkpoint._format import CheckpointError, check_storable, dtype_name, encode_value
from shardflow.distributed.placement import LocalPlacement

LAYOUTS = ("rows", "replicated")
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


@dataclass(slots=True)
class Part:
    """One tensor as this rank holds it: rows ``rows`` of the global tensor ``name``."""

    name: str
    local: Tensor
    """A plain tensor: rows ``rows`` of the global tensor (all of it when 0-d)."""
    shape: list[int]
    """The global shape."""
    rows: tuple[int, int] | None
    """``[start, stop)`` along dim 0; None for a 0-d tensor."""
    layout: str
    digest: str | None = None
    """SHA-256 of a replicated optimizer tensor's bytes, compared between its holders."""

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": self.shape,
            "dtype": dtype_name(self.local.dtype),
            "rows": list(self.rows) if self.rows is not None else None,
            "layout": self.layout,
            "bytes": self.local.numel() * self.local.element_size(),
            "digest": self.digest,
        }


def clean_name(name: str) -> str:
    """Drop wrapper components from an FQN (``module.`` first, ``_orig_mod.`` anywhere...)."""
    parts = name.split(".")
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def model_key(name: str) -> str:
    return f"model/{name}"


def state_key(param_name: str, key: str) -> str:
    return f"optim/{param_name}/{key}"


# -- model --------------------------------------------------------------------------------------


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def local_rows(tensor: Tensor, name: str) -> tuple[Tensor, tuple[int, int] | None]:
    """This rank's plain tensor and the global rows it holds (DTensor-aware)."""
    if not _is_dtensor(tensor):
        local = tensor.detach()
        return local, ((0, local.shape[0]) if local.ndim else None)
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415
    from torch.distributed.tensor._utils import (  # noqa: PLC0415
        compute_local_shape_and_global_offset,
    )

    for placement in tensor.placements:
        if not (
            isinstance(placement, Replicate) or type(placement) is Shard and placement.dim == 0
        ):
            raise CheckpointError(
                f"{name} is a DTensor placed {tensor.placements}: checkpoints support Shard(0) "
                "(FSDP2) and Replicate placements."
            )
    local = tensor.to_local().detach()
    if tensor.ndim == 0:
        return local, None
    _, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    start = int(offset[0]) if offset else 0
    return local, (start, start + local.shape[0])


def model_tensors(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """``(clean name, tensor)`` for every entry of ``model.state_dict()``."""
    out = []
    seen: set[str] = set()
    for raw, value in model.state_dict(keep_vars=True).items():
        name = clean_name(raw)
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"model.state_dict()[{raw!r}] is a {type(value).__name__}, not a tensor: "
                "checkpoints hold tensors only (extra module state is not supported)."
            )
        if name in seen:
            raise CheckpointError(
                f"two model entries are both named {name!r} once wrappers are removed."
            )
        seen.add(name)
        out.append((name, value))
    return out


def model_parts(model: torch.nn.Module) -> list[Part]:
    parts = []
    for name, value in model_tensors(model):
        local, rows = local_rows(value, name)
        check_storable(name, local)
        parts.append(Part(model_key(name), local, list(value.shape), rows, "rows"))
    return parts


# -- optimizer ----------------------------------------------------------------------------------


def placement_of(optimizer: torch.optim.Optimizer) -> LocalPlacement:
    return getattr(optimizer, "placement", None) or LocalPlacement()


def param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> list[list[str]]:
    """The stable name of every optimizer parameter, per group (see the module docstring)."""
    if model is not None:
        by_id = {id(p): clean_name(n) for n, p in model.named_parameters()}
        names = []
        for g, group in enumerate(optimizer.param_groups):
            row = []
            for i, p in enumerate(group["params"]):
                if id(p) not in by_id:
                    raise CheckpointError(
                        f"optimizer parameter {i} of param group {g} (shape {tuple(p.shape)}) is "
                        "not a parameter of the model passed: pass the model the optimizer updates."
                    )
                row.append(by_id[id(p)])
            names.append(row)
    else:
        names = [
            [clean_name(n) for n in group["param_names"]]
            if group.get("param_names")
            else [f"param_groups.{g}.{i}" for i in range(len(group["params"]))]
            for g, group in enumerate(optimizer.param_groups)
        ]
    flat = [n for row in names for n in row]
    if len(set(flat)) != len(flat):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise CheckpointError(f"optimizer parameters {dup} appear more than once.")
    return names


def layout_of(
    optimizer: torch.optim.Optimizer, key: str, value: Tensor, local_param: Tensor
) -> str:
    """How state ``key`` reshards: the optimizer's declaration, or inferred for torch.optim."""
    declared = getattr(type(optimizer), "state_layout", None)
    if declared is None:
        same = value.ndim >= 1 and value.shape == local_param.shape
        return "rows" if same else "replicated"
    if key not in declared:
        raise CheckpointError(
            f"{type(optimizer).__name__}.state_layout does not declare state key {key!r}: add "
            f"{key!r}: 'rows' or 'replicated' to it."
        )
    layout = declared[key]
    if layout not in LAYOUTS:
        raise CheckpointError(
            f"{type(optimizer).__name__}.state_layout[{key!r}]={layout!r} is unknown: use one of "
            f"{list(LAYOUTS)}."
        )
    return layout


def holds_state(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[int, int] | None:
    """The rows of ``param`` whose state this rank keeps, or None (not its owner)."""
    placement = placement_of(optimizer)
    return placement.row_range(param) if placement.owns(param) else None


def state_tensor_spec(
    optimizer: torch.optim.Optimizer, param: Tensor, key: str, value: Tensor, where: str
) -> tuple[str, Tensor, list[int], tuple[int, int] | None]:
    """``(layout, local, global shape, rows)`` of one state tensor of a parameter this rank owns."""
    placement = placement_of(optimizer)
    rows_held = placement.row_range(param)
    local = placement.local(value).detach()
    layout = layout_of(optimizer, key, local, placement.local(param))
    if _is_dtensor(local):  # state kept as a DTensor (torch.optim on FSDP2) says where it lives
        plain, rows = local_rows(local, where)
        return layout, plain, list(local.shape), rows
    if layout == "rows" and local.ndim >= 1:
        global_shape = placement.global_shape(param)
        if len(global_shape) == 0:
            raise CheckpointError(f"{where} is declared 'rows' but its parameter is 0-d.")
        start, stop = rows_held
        if local.shape[0] != stop - start:
            raise CheckpointError(
                f"{where} is declared 'rows' but has {local.shape[0]} rows where this rank holds "
                f"rows [{start}, {stop}) of the parameter: declare it 'replicated', or shape its "
                "dim 0 like the parameter's rows."
            )
        return layout, local, [int(global_shape[0]), *local.shape[1:]], (start, stop)
    rows = (0, local.shape[0]) if local.ndim else None
    return layout, local, list(local.shape), rows


def optimizer_parts(
    optimizer: torch.optim.Optimizer, names: list[list[str]]
) -> tuple[list[Part], dict[str, dict[str, Any]], float | None]:
    """This rank's optimizer state: tensor parts, JSON values per param, and the largest step."""
    parts: list[Part] = []
    values: dict[str, dict[str, Any]] = {}
    step: float | None = None
    for group, group_names in zip(optimizer.param_groups, names):
        for p, name in zip(group["params"], group_names):
            if holds_state(optimizer, p) is None:
                continue
            entry = values.setdefault(name, {})
            for key, value in optimizer.state.get(p, {}).items():
                where = f"{type(optimizer).__name__} state {key!r} of {name}"
                if not isinstance(key, str) or "/" in key:
                    raise CheckpointError(f"{where}: state keys must be strings without '/'.")
                if not isinstance(value, Tensor):
                    entry[key] = {"value": encode_value(value, where)}
                    continue
                layout, local, shape, rows = state_tensor_spec(optimizer, p, key, value, where)
                check_storable(where, local)
                digest = _digest(local) if layout == "replicated" else None
                parts.append(Part(state_key(name, key), local, shape, rows, layout, digest))
                entry[key] = {"tensor": state_key(name, key)}
                if key == "step" and local.numel() == 1:
                    step = max(step or 0.0, float(local))
    return parts, values, step


def _digest(t: Tensor) -> str:
    flat = t.detach().reshape(-1).cpu().contiguous()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()
