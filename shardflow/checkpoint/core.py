"""``save`` and ``load``: model and optimizer state as safetensors, for any placement, any world size.

A checkpoint is a directory::

    step_00000120/
      index.json                          # written last: the table of contents
      rank-00000-of-00002.safetensors     # what rank 0 wrote
      rank-00001-of-00002.safetensors

``index.json`` records the format name and version, the world size, every file's size and
SHA-256, every tensor's global shape, dtype, layout and the row slice each file holds
(``pieces: [[file, start, stop], ...]``), the optimizer's class, param groups (hyperparameters,
JSON) with the names of their parameters, per parameter its state keys (a tensor's name or a
JSON value), the largest step counter, ``extra`` (yours, JSON), and (format version 2) the
SHA-256 of all that (``index_sha256``), so an edited index is refused. Nothing is pickled;
loading parses JSON and safetensors headers only. The files an index lists must be plain names
inside the checkpoint directory, and the hyperparameters it holds must pass the optimizer's
constructor checks.

Save runs in three phases, each ending in one ``all_gather`` of metadata and status: (1) every
rank reports what it holds (:mod:`._collect`) and rank 0 prepares the temporary directory;
(2) every rank writes the pieces the plan gives it (:mod:`._plan`) to its own file; (3) rank 0
writes the index and commits (:mod:`._directory`). Load checks the index, every name, shape,
dtype and layout against the model and optimizer, the files' sizes and checksums (each file hashed
by one rank), and only when every rank found everything in order copies the rows each rank needs
straight into its tensors — so a refused checkpoint changes nothing.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from shardflow.checkpoint import _directory as directory
from shardflow.checkpoint._collect import (
    Part,
    holds_state,
    local_rows,
    model_key,
    model_parts,
    model_tensors,
    optimizer_parts,
    param_names,
    state_tensor_spec,
)
from shardflow.checkpoint._comm import Comm, resolve_comm
from shardflow.checkpoint._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_HASH_KEY,
    INDEX_NAME,
    CheckpointError,
    SafetensorsReader,
    check_file_name,
    decode_value,
    dtype_name,
    encode_value,
    fsync_dir,
    index_digest,
    index_text,
    sha256_file,
    write_safetensors,
    write_text,
)
from shardflow.checkpoint._plan import check_record, file_name, overlaps, plan_pieces

T = TypeVar("T")


# -- agreement between ranks --------------------------------------------------------------------


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        return None, exc


def _agree(comm: Comm, value: Any, error: BaseException | None) -> list[Any]:
    """All-gather ``value`` (or the error); raise on every rank if any rank failed."""
    message = None if error is None else _describe(error)
    gathered = comm.all_gather((value, message))
    if error is not None:
        raise error
    for rank, (_, msg) in enumerate(gathered):
        if msg is not None:
            raise CheckpointError(f"rank {rank} of {comm.world_size} failed: {msg}")
    return [v for v, _ in gathered]


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"


# -- save ---------------------------------------------------------------------------------------


def _check_save_args(model: Any, optimizer: Any, keep: int | None, final: Path) -> None:
    if model is None and optimizer is None:
        raise ValueError("save() needs model=, optimizer= or both: there is nothing to save.")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep!r} is invalid: pass an integer >= 1, or None to keep all.")
    if keep is not None and directory.step_of(final) is None:
        raise ValueError(
            f"keep={keep} needs step-numbered checkpoints, but the path {str(final)!r} is not "
            "named step_<N>: use shardflow.checkpoint.step_path(directory, step)."
        )


def _optimizer_header(optimizer: torch.optim.Optimizer, names: list[list[str]]) -> dict[str, Any]:
    groups = []
    for g, (group, group_names) in enumerate(zip(optimizer.param_groups, names)):
        hyper = {
            k: encode_value(v, f"param group {g} {k!r}")
            for k, v in group.items()
            if k not in ("params", "param_names")
        }
        groups.append({"params": group_names, **hyper})
    return {
        "class": type(optimizer).__name__,
        "param_groups": groups,
        "nonfinite_steps": getattr(optimizer, "nonfinite_steps", None),
    }


@dataclass(slots=True)
class _Holdings:
    parts: list[Part]
    report: dict[str, Any]


def _collect(model, optimizer, extra) -> _Holdings:
    parts: list[Part] = []
    report: dict[str, Any] = {"nonce": secrets.token_hex(8)}
    if model is not None:
        parts += model_parts(model)
        report["model"] = {"class": type(model).__name__}
    if optimizer is not None:
        names = param_names(optimizer, model)
        opt_parts, values, step = optimizer_parts(optimizer, names)
        parts += opt_parts
        report["optimizer"] = _optimizer_header(optimizer, names)
        report["values"] = values
        report["step"] = step
    report["extra"] = encode_value(extra, "extra")
    json.dumps(report["extra"])
    report["metas"] = [p.meta() for p in parts]
    return _Holdings(parts, report)


def _plan(reports: list[dict[str, Any]]):
    """Check what the ranks hold together, then choose writers (the same on every rank)."""
    if "optimizer" in reports[0]:
        names = [n for g in reports[0]["optimizer"]["param_groups"] for n in g["params"]]
        owned = {n for r in reports for n in r["values"]}
        orphans = [n for n in names if n not in owned]
        if orphans:
            raise CheckpointError(
                f"the optimizer state of {orphans[:5]} is held by no rank (no rank owns those "
                "parameters): the placement must give every parameter an owner."
            )
    return plan_pieces([r["metas"] for r in reports])


def _index(reports: list[dict[str, Any]], plan, files: dict[str, Any]) -> dict[str, Any]:
    first = reports[0]
    index: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "world_size": len(reports),
        "files": files,
        "tensors": plan.tensors,
        "model": first.get("model"),
        "optimizer": None,
        "extra": first["extra"],
    }
    if "optimizer" in first:
        state: dict[str, dict[str, Any]] = {}
        for report in reports:  # each parameter's state as its first owner reported it
            for name, keys in report["values"].items():
                state.setdefault(name, keys)
        steps = [r["step"] for r in reports if r["step"] is not None]
        names = [n for g in first["optimizer"]["param_groups"] for n in g["params"]]
        index["optimizer"] = {
            **first["optimizer"],
            "step": int(max(steps)) if steps else None,
            "state": {n: state.get(n, {}) for n in names},
        }
    index[INDEX_HASH_KEY] = index_digest(index)
    return index


def save(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
    process_group: Any = None,
) -> Path:
    """Write model and optimizer state to the checkpoint directory ``path``, atomically.

    Every rank of the group calls it (the group: ``process_group``, else the optimizer's, else
    the default group when ``torch.distributed`` is initialized, else one process); ``path``
    must name the same directory on every rank (a shared filesystem when ranks span machines).

    Args:
        path: the checkpoint directory; it appears, complete, only when the save succeeds (an
            existing one is replaced). Name it ``step_path(directory, step)`` to use ``keep``
            and :func:`latest`.
        model: its ``state_dict()`` tensors are saved (sharded DTensors slice by slice);
            its parameter names also name the optimizer's state.
        optimizer: state, param-group hyperparameters and step counters.
        extra: JSON-serializable values returned by :func:`load` (step, data position...).
        keep: after the save, keep only the newest ``keep`` step-numbered checkpoints in
            ``path``'s parent directory.
        process_group: a ProcessGroup or 1-D DeviceMesh to coordinate over (see above).

    Returns:
        The checkpoint directory.
    """
    final = Path(path)
    _check_save_args(model, optimizer, keep, final)
    comm = resolve_comm(process_group, optimizer)
    extra = {} if extra is None else extra

    def phase1() -> _Holdings:
        held = _collect(model, optimizer, extra)
        if comm.rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            directory.clean_leftovers(final.parent)
            directory.temporary(final, "tmp", held.report["nonce"]).mkdir()
        return held

    held, error = _attempt(phase1)
    reports = _agree(comm, None if held is None else held.report, error)
    nonce = reports[0]["nonce"]
    tmp = directory.temporary(final, "tmp", nonce)
    try:
        plan, error = _attempt(lambda: _plan(reports))
        if error is not None:
            raise error

        def phase2() -> dict[str, Any]:
            mine = [
                (p.name, p.local)
                for p in held.parts
                if plan.writer.get((p.name, p.rows)) == comm.rank
            ]
            name = file_name(comm.rank, comm.world_size)
            record = write_safetensors(tmp / name, mine, {"format": "pt"})
            return {"name": name, "bytes": record.bytes, "sha256": record.sha256}

        records = _agree(comm, *_attempt(phase2))

        def phase3() -> None:
            if comm.rank != 0:
                return
            files = {r["name"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in records}
            write_text(tmp / INDEX_NAME, index_text(_index(reports, plan, files)))
            fsync_dir(tmp)
            directory.commit(tmp, final, nonce)
            if keep is not None:
                directory.prune(final.parent, keep, final, nonce)

        _agree(comm, *_attempt(phase3))
    finally:
        if comm.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- load ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    """A tensor to fill: rows ``rows`` of checkpoint tensor ``name`` go into ``dest``."""

    name: str
    dest: Tensor
    rows: tuple[int, int] | None


@dataclass(slots=True)
class _LoadPlan:
    index: dict[str, Any]
    targets: list[_Target]
    updates: list[dict[str, Any]]
    values: list[tuple[dict[str, Any], str, Any]]


def read_index(path: Path) -> dict[str, Any]:
    """Parse and check a checkpoint's index (format, version, files, tensor records)."""
    index_path = path / INDEX_NAME
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory (it does not exist).")
    if not index_path.is_file():
        raise CheckpointError(
            f"{str(index_path)!r} is missing: {str(path)!r} is not a complete checkpoint "
            "(a save that did not finish leaves no index)."
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(index_path)!r} is not valid JSON ({exc}).") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(index_path)!r} is not a ShardFlow checkpoint index.")
    _check_version(index_path, index)
    if index["version"] >= 2 and index.get(INDEX_HASH_KEY) != index_digest(index):
        what = "lacks its content hash" if INDEX_HASH_KEY not in index else "was changed"
        raise CheckpointError(
            f"{str(index_path)!r} {what} after it was written ({INDEX_HASH_KEY} does not match "
            "its content): an edited index is refused. Restore it, or load an earlier "
            "checkpoint; to train with other hyperparameters change the config (on resume the "
            "config's hyperparameters win), not the index."
        )
    for key in ("files", "tensors", "world_size"):
        if key not in index:
            raise CheckpointError(f"{str(index_path)!r} lacks its {key!r} section.")
    for name in index["files"]:
        check_file_name(index_path, name)
    for name, record in index["tensors"].items():
        check_record(name, record, index["files"])
    return index


def _check_version(index_path: Path, index: dict[str, Any]) -> None:
    """The format version is an integer this ShardFlow reads; each way it is not has its message."""
    where = repr(str(index_path))
    if "version" not in index:
        raise CheckpointError(
            f"{where} has no format version: every ShardFlow index records one, so it is "
            "damaged or was written by another tool. Restore it, or save the checkpoint again."
        )
    version = index["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{where} has format version {version!r}, a {type(version).__name__}: ShardFlow "
            f"writes an integer (1 to {FORMAT_VERSION}), so the index was edited or written by "
            "another tool. Restore it, or save the checkpoint again."
        )
    if version < 1:
        raise CheckpointError(
            f"{where} has format version {version}, which never existed (the first is 1): the "
            "index is damaged or was edited. Restore it, or save the checkpoint again."
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {version!r}, newer than this ShardFlow "
            f"reads (up to {FORMAT_VERSION}): upgrade ShardFlow to load it."
        )


def _mismatch(what: str, saved: set[str], here: set[str], path: Path) -> None:
    if saved == here:
        return
    missing, unexpected = sorted(here - saved), sorted(saved - here)
    raise CheckpointError(
        f"{str(path)!r} holds a different {what}: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''} (was it saved from another model?)."
    )


def _check_tensor(
    path: Path, record: dict, name: str, shape: list[int], dtype: torch.dtype, layout: str
) -> None:
    if record["shape"] != list(shape):
        raise CheckpointError(
            f"{str(path)!r}: {name} has shape {record['shape']} in the checkpoint but "
            f"{list(shape)} here."
        )
    if record["dtype"] != dtype_name(dtype):
        raise CheckpointError(
            f"{str(path)!r}: {name} has dtype {record['dtype']} in the checkpoint but "
            f"{dtype_name(dtype)} here."
        )
    if record["layout"] != layout:
        raise CheckpointError(
            f"{str(path)!r}: {name} was saved with layout {record['layout']!r} but reshards as "
            f"{layout!r} here."
        )


def _model_targets(path: Path, index: dict, model: torch.nn.Module) -> list[_Target]:
    if index.get("model") is None:
        raise CheckpointError(f"{str(path)!r} holds no model state: load it with model=None.")
    entries = model_tensors(model)
    saved = {n.removeprefix("model/") for n in index["tensors"] if n.startswith("model/")}
    _mismatch("model", saved, {n for n, _ in entries}, path)
    targets = []
    for name, value in entries:
        local, rows = local_rows(value, name)
        record = index["tensors"][model_key(name)]
        _check_tensor(path, record, model_key(name), list(value.shape), local.dtype, "rows")
        targets.append(_Target(model_key(name), local, rows))
    return targets


def _optimizer_targets(
    path: Path, index: dict, optimizer: torch.optim.Optimizer, model: Any
) -> tuple[list[_Target], list[dict[str, Any]], list[tuple[dict, str, Any]]]:
    saved = index.get("optimizer")
    if saved is None:
        raise CheckpointError(
            f"{str(path)!r} holds no optimizer state: load it with optimizer=None."
        )
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(
            f"{str(path)!r} holds {saved['class']} state, not {type(optimizer).__name__} state."
        )
    names = param_names(optimizer, model)
    _mismatch(
        "set of optimizer parameters", set(saved["state"]), {n for g in names for n in g}, path
    )
    if len(saved["param_groups"]) != len(names):
        raise CheckpointError(
            f"{str(path)!r} has {len(saved['param_groups'])} param groups, this optimizer "
            f"{len(names)}: build the optimizer with the same groups."
        )
    updates = []
    for g, (group, here) in enumerate(zip(saved["param_groups"], names)):
        if group["params"] != here:
            raise CheckpointError(
                f"{str(path)!r}: param group {g} holds {group['params'][:4]}... in the "
                f"checkpoint but {here[:4]}... here: build the optimizer with the same groups."
            )
        update = {k: decode_value(v) for k, v in group.items() if k != "params"}
        _check_hyperparameters(path, optimizer, g, update)
        updates.append(update)
    targets, values = [], []
    for group, group_names in zip(optimizer.param_groups, names):
        for p, name in zip(group["params"], group_names):
            if holds_state(optimizer, p) is None:
                continue
            state = optimizer.state.get(p, {})
            stored = saved["state"][name]
            _mismatch(f"state of {name}", set(stored), set(state), path)
            for key, value in state.items():
                entry = stored[key]
                where = f"state {key!r} of {name}"
                if not isinstance(value, Tensor):
                    if "value" not in entry:
                        raise CheckpointError(
                            f"{str(path)!r}: {where} is a tensor there, not here."
                        )
                    values.append((state, key, decode_value(entry["value"])))
                    continue
                if "tensor" not in entry or entry["tensor"] not in index["tensors"]:
                    raise CheckpointError(f"{str(path)!r}: {where} is not a tensor there.")
                layout, local, shape, rows = state_tensor_spec(optimizer, p, key, value, where)
                record = index["tensors"][entry["tensor"]]
                _check_tensor(path, record, entry["tensor"], shape, local.dtype, layout)
                targets.append(_Target(entry["tensor"], local, rows))
    return targets, updates, values


def _check_hyperparameters(
    path: Path, optimizer: torch.optim.Optimizer, g: int, update: dict[str, Any]
) -> None:
    """Group ``g`` as it would be after loading passes the optimizer's constructor checks: its
    ``check_param_group`` (ShardFlow optimizers), else a throwaway instance of its class built
    with those hyperparameters (torch optimizers validate in their constructor)."""
    group = {**optimizer.param_groups[g], **update}
    try:
        check = getattr(optimizer, "check_param_group", None)
        if check is not None:
            check(group)
        else:
            _construct_like(optimizer, group)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{str(path)!r}: param group {g} holds a value {type(optimizer).__name__}'s "
            f"constructor refuses: {exc}"
        ) from None


def _construct_like(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """Build ``type(optimizer)`` over one scalar with ``group``'s keys that it takes."""
    taken = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {k: v for k, v in group.items() if k in taken and k not in ("self", "params")}
    type(optimizer)([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def _check_files(path: Path, index: dict) -> None:
    for name, info in index["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{str(file)!r} is missing (the index lists it).")
        size = file.stat().st_size
        if size != info["bytes"]:
            kind = "truncated" if size < info["bytes"] else "longer than recorded"
            raise CheckpointError(
                f"{str(file)!r} is {kind}: {size} bytes, the index records {info['bytes']}."
            )


def _verify_checksums(path: Path, index: dict, comm: Comm) -> None:
    """Hash this rank's share of the files (file i on rank i mod W)."""
    for i, (name, info) in enumerate(sorted(index["files"].items())):
        if i % comm.world_size != comm.rank:
            continue
        if sha256_file(path / name) != info["sha256"]:
            raise CheckpointError(
                f"{str(path / name)!r} is corrupted: its SHA-256 differs from the one in the index."
            )


def _check_headers(path: Path, index: dict, targets: list[_Target], readers: dict) -> None:
    """Every piece a target needs is in its file's header, with the right shape and dtype."""
    for target in targets:
        record = index["tensors"][target.name]
        for file, a, b, _, _ in overlaps(record, target.rows):
            dtype, shape = readers[file].info(target.name)
            expected = list(record["shape"])
            if expected:
                expected[0] = b - a
            if shape != expected or dtype_name(dtype) != record["dtype"]:
                raise CheckpointError(
                    f"{str(path / file)!r}: {target.name} is {dtype_name(dtype)} {shape} in the "
                    f"file but the index says {record['dtype']} {expected}."
                )


def _open_all(path: Path, files: list[str], stack: ExitStack) -> dict[str, SafetensorsReader]:
    return {name: stack.enter_context(SafetensorsReader(path / name)) for name in files}


def _copy(target: _Target, record: dict, readers: dict) -> None:
    """Read the target's rows from every piece holding some of them, straight into ``dest``."""
    if target.rows is None:
        ((file, *_),) = record["pieces"]
        readers[file].read_rows(target.name, target.dest)
        return
    start = target.rows[0]
    for file, a, _, lo, hi in overlaps(record, target.rows):
        readers[file].read_rows(target.name, target.dest[lo - start : hi - start], lo - a, hi - a)


def load(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: Any = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore model and optimizer state from the checkpoint ``path`` in place; return ``extra``.

    Works at any world size and placement, whatever the checkpoint was saved with: each rank
    reads just the rows it holds from whichever files hold them. Every rank of the group calls
    it. Refused — :class:`CheckpointError` naming the file and what is wrong, with nothing
    changed on any rank — when the checkpoint is incomplete, corrupted or truncated, misses a
    rank file, has an edited index, a file outside its directory, a format version this
    ShardFlow does not read, hyperparameters the optimizer's constructor would refuse, or does
    not match the model or optimizer (names, shapes, dtypes, layouts, param groups). ``verify=False`` skips the SHA-256 pass (sizes and
    headers are still checked).

    The param groups' hyperparameters are restored from the checkpoint, as
    ``torch.optim.Optimizer.load_state_dict`` does; every state tensor keeps its dtype.
    """
    path = Path(path)
    if model is None and optimizer is None:
        raise ValueError("load() needs model=, optimizer= or both: there is nothing to load.")
    comm = resolve_comm(process_group, optimizer)

    def prepare() -> _LoadPlan:
        index = read_index(path)
        targets: list[_Target] = []
        updates: list[dict[str, Any]] = []
        values: list[tuple[dict, str, Any]] = []
        if model is not None:
            targets += _model_targets(path, index, model)
        if optimizer is not None:
            found, updates, values = _optimizer_targets(path, index, optimizer, model)
            targets += found
        _check_files(path, index)
        if verify:
            _verify_checksums(path, index, comm)
        return _LoadPlan(index, targets, updates, values)

    plan, error = _attempt(prepare)
    with ExitStack() as stack:
        readers: dict[str, Any] = {}

        def open_and_check() -> None:
            if plan is None:
                return
            needed = sorted(
                {
                    f
                    for t in plan.targets
                    for f, *_ in overlaps(plan.index["tensors"][t.name], t.rows)
                }
            )
            readers.update(_open_all(path, needed, stack))
            _check_headers(path, plan.index, plan.targets, readers)

        if error is None:
            _, error = _attempt(open_and_check)
        _agree(comm, None, error)
        with torch.no_grad():
            for target in plan.targets:
                _copy(target, plan.index["tensors"][target.name], readers)
    if optimizer is not None:
        _assign_optimizer(optimizer, plan)
    return decode_value(plan.index.get("extra") or {})


def _assign_optimizer(optimizer: torch.optim.Optimizer, plan: _LoadPlan) -> None:
    for group, update in zip(optimizer.param_groups, plan.updates):
        group.update(update)
    for state, key, value in plan.values:
        state[key] = value
    counted = plan.index["optimizer"].get("nonfinite_steps")
    if counted is not None and hasattr(optimizer, "nonfinite_steps"):
        optimizer.nonfinite_steps = counted
