"""Run checkpoints behind three names: :func:`save`, :func:`load`, :func:`latest`.

Today the inside is torch.distributed.checkpoint (DCP); it will be swapped for
``shardflow.checkpoint`` (safetensors, reshard on load) without changing these three functions.

Layout: ``<dir>/step_00000040/`` holds the DCP files and ``extra.json`` (step, metrics state).
A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed when complete, so a killed run
leaves either the previous checkpoint or the new one, never a half-written one that counts.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PREFIX = "step_"
EXTRA = "extra.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save or dcp.load; without a process group DCP warns that it assumes one process,
    which is what a single-process run means, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(directory: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(directory) / f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / EXTRA).is_file()


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and _complete(p)
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = checkpoints(Path(directory))
    return found[-1] if found else None


def save(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write model and optimizer state plus ``extra`` (JSON) to ``path``, atomically.

    Every rank must call it. With ``keep`` > 0, older complete checkpoints beyond the newest
    ``keep`` in the same folder are deleted.
    """
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    _dcp(dcp.save, state, tmp)
    if _rank() == 0:
        with open(tmp / EXTRA, "w") as fh:
            json.dump(extra, fh)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(final.parent)
        if keep > 0:
            for old in checkpoints(final.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model and optimizer state from ``path`` in place; return its ``extra``."""
    path = Path(path)
    if not _complete(path):
        raise FileNotFoundError(f"checkpoint {str(path)!r} is missing or incomplete.")
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    _dcp(dcp.load, state, path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return json.loads((path / EXTRA).read_text())
