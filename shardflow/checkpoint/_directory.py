"""The atomic directory protocol: a checkpoint exists once its directory has its final name.

Writing ``<dir>/step_00000120``:

1. every rank writes its file into ``step_00000120.tmp-<nonce>/`` and fsyncs it;
2. rank 0 writes ``index.json`` last, fsyncs it and the directory;
3. rank 0 renames the directory to ``step_00000120`` and fsyncs the parent — the commit point;
4. only then are older checkpoints beyond the newest ``keep`` deleted (each renamed to
   ``*.deleting-<nonce>`` first, so a half-deleted one never looks complete).

A process killed at any moment leaves either the previous state or the new complete checkpoint;
leftovers (``*.tmp-*``, ``*.deleting-*``) are removed by the next save. Overwriting an existing
checkpoint moves it to ``*.old-<nonce>`` before the rename; if a kill falls between those two
renames, the next save puts the old one back.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from shardflow.checkpoint._format import INDEX_NAME, fsync_dir

STEP_PREFIX = "step_"
_STEP = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^(?P<base>.+)\.(?P<kind>tmp|old|deleting)-(?P<nonce>[0-9a-f]{8,})$")


def step_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory`` (``step_00000120``)."""
    return Path(directory) / f"{STEP_PREFIX}{int(step):08d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step number in a checkpoint directory's name, or None."""
    found = _STEP.match(Path(path).name)
    return int(found.group(1)) if found else None


def is_complete(path: Path) -> bool:
    """A checkpoint is complete once its index exists (written last, before the rename)."""
    return (path / INDEX_NAME).is_file()


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete step-named checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory`` (highest step), or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def temporary(final: Path, kind: str, nonce: str) -> Path:
    return final.with_name(f"{final.name}.{kind}-{nonce}")


def clean_leftovers(directory: Path) -> None:
    """Remove what killed saves left in ``directory``; restore an overwritten checkpoint whose
    replacement never arrived."""
    if not directory.is_dir():
        return
    for entry in sorted(directory.iterdir()):
        found = _LEFTOVER.match(entry.name)
        if not found or not entry.is_dir():
            continue
        base = directory / found.group("base")
        if found.group("kind") == "old" and not base.exists() and is_complete(entry):
            os.rename(entry, base)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    fsync_dir(directory)


def commit(tmp: Path, final: Path, nonce: str) -> None:
    """Rename the finished ``tmp`` to ``final`` (moving an existing ``final`` aside first)."""
    aside = None
    if final.exists():
        aside = temporary(final, "old", nonce)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def prune(directory: Path, keep: int, protect: Path, nonce: str) -> None:
    """Delete complete checkpoints beyond the newest ``keep`` (never ``protect``)."""
    for old in checkpoints(directory)[:-keep]:
        if old.resolve() == protect.resolve():
            continue
        trash = temporary(old, "deleting", nonce)
        os.rename(old, trash)
        fsync_dir(directory)
        shutil.rmtree(trash, ignore_errors=True)
