"""A save killed (SIGKILL) at any moment leaves the previous checkpoint loadable and ``latest``.

A forked child process saves step 1, takes a step, and starts saving step 2 with a pause
inserted at one moment of the protocol; the parent kills it with SIGKILL there. Moments: midway
through the rank file, while writing the index, just before the commit rename, and while pruning
the older checkpoint (after the commit: then the new one must be the one found and loaded).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import shardflow.checkpoint as ck
from shardflow import DolphinFlow


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))


def _child(directory: str, moment: str, paused) -> None:
    """Save step 1, step, then save step 2 pausing (to be killed) at ``moment``."""
    from shardflow.checkpoint import _directory, _format, core  # noqa: PLC0415

    # A forked child that inherits a used OpenMP pool can hang in its first parallel op.
    torch.set_num_threads(1)

    def pause(*_):
        paused.set()
        time.sleep(120)

    model = _model()
    opt = DolphinFlow(model.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        model(torch.ones(4, 64)).square().sum().backward()
        opt.step()

    step()
    ck.save(ck.step_path(directory, 1), model=model, optimizer=opt, extra={"step": 1}, keep=1)
    step()
    if moment == "file":
        chunks = _format._byte_chunks

        def slow(t):
            yield from chunks(t)
            if t.numel() > 1000:  # after the first large tensor, others still to come
                pause()

        _format._byte_chunks = slow
    elif moment == "index":
        core.write_text = pause
    elif moment == "rename":
        commit = _directory.commit

        def late(*args):
            pause()
            commit(*args)

        _directory.commit = late
    elif moment == "prune":
        rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            if "deleting" in str(path):  # renamed away, not yet deleted
                pause()
            rmtree(path, *args, **kwargs)

        _directory.shutil.rmtree = slow_rmtree
    ck.save(ck.step_path(directory, 2), model=model, optimizer=opt, extra={"step": 2}, keep=1)


def _kill_midway(directory: Path, moment: str) -> None:
    ctx = mp.get_context("fork")  # torch is already imported: the child starts in milliseconds
    paused = ctx.Event()
    child = ctx.Process(target=_child, args=(str(directory), moment, paused), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not paused.wait(timeout=0.1):
            assert child.is_alive(), f"the child exited ({child.exitcode}) before the pause"
            assert time.monotonic() < deadline, "the child never reached the pause"
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("moment", ["file", "index", "rename", "prune"])
def test_a_killed_save_leaves_a_loadable_checkpoint(moment, tmp_path):
    _kill_midway(tmp_path, moment)
    expected_step = 2 if moment == "prune" else 1
    found = ck.latest(tmp_path)
    assert found == ck.step_path(tmp_path, expected_step)
    model = _model()
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    assert ck.load(found, model=model, optimizer=opt) == {"step": expected_step}
    assert opt.state[model[0].weight]["step"].item() == expected_step
    if moment != "prune":
        assert not ck.step_path(tmp_path, 2).exists()
        assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the torn save's leftovers
    # The next save removes what the killed one left behind.
    ck.save(ck.step_path(tmp_path, 3), model=model, optimizer=opt, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
