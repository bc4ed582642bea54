"""Ranks that build or load an optimizer with different settings get the same ValueError, fast.

Issue 18 item 2: DolphinFlow under FSDP2 with ``ortho_mode="vector"`` on rank 0 and ``"matrix"``
on rank 1 deadlocked in the first step (one rank joined the Newton-Schulz all-to-all, the other
did not), and a per-rank ``lr`` was silently mixed (each shard or owner used its own). Real gloo
processes, 2 ranks, FSDP2 and the DDP-aware owner plan; after each refusal the ranks still
build a matching optimizer and step together (nothing was left half-collected).
"""

from __future__ import annotations

import copy
import re
import time

import pytest
import torch
import torch.distributed as dist
from dist import place, run_on_ranks
from torch import nn

from shardflow import DolphinFlow

PLACEMENTS = ["fsdp", "ddp"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _attempt(fn) -> tuple[str | None, float]:
    """``fn()``'s ValueError message (None if it returned) and the seconds it took."""
    began = time.monotonic()
    try:
        fn()
        return None, time.monotonic() - began
    except ValueError as exc:
        return str(exc), time.monotonic() - began


def _refused_quickly(results: list[tuple[str | None, float]], pattern: str) -> None:
    """Every rank's error matches ``pattern`` and came within 10 s (no collective timeout)."""
    for error, seconds in results:
        assert error is not None and re.search(pattern, error), error
        assert seconds < 10


def _step_together(model, group) -> None:
    """Build a matching optimizer and take one step: the ranks are still in step."""
    opt = DolphinFlow(model.parameters(), ortho_mode="matrix", process_group=group)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()


def _construct(rank, world, placement, differ):
    model = _model()
    group = place(model, placement, world)
    mine = {"ortho_mode": ("vector", "matrix")[rank]} if differ == "ortho_mode" else {}
    if differ == "lr":
        mine = {"lr": (1e-3, 2e-3)[rank]}
    error, seconds = _attempt(lambda: DolphinFlow(model.parameters(), **mine, process_group=group))
    _step_together(model, group)
    return error, seconds


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    "differ,pattern",
    [
        ("ortho_mode", r"param group 0 'ortho_mode' is 'vector' on rank 0 and 'matrix' on rank 1"),
        ("lr", r"param group 0 'lr' is 0\.001 on rank 0 and 0\.002 on rank 1"),
    ],
)
def test_different_hyperparameters_are_one_error_on_every_rank(placement, differ, pattern):
    results = run_on_ranks(_construct, 2, placement, differ, timeout=60)
    _refused_quickly(results, pattern)
    assert "same hyperparameters" in results[0][0]
    assert results[0][0] == results[1][0]


def _named_routing(rank, world):
    """The same hyperparameters, but rank 1 names the matrix like an embedding: it would not be
    orthogonalized there (routing by name), while rank 0 orthogonalizes it."""
    model = _model()
    name = ("layers.0.weight", "embed.weight")[rank]
    named = [(name, model[0].weight), ("layers.2.weight", model[2].weight)]
    error, _ = _attempt(
        lambda: DolphinFlow(named, ortho_mode="matrix", process_group=dist.group.WORLD)
    )
    return error


def test_different_newton_schulz_tiles_are_one_error_on_every_rank():
    r0, r1 = run_on_ranks(_named_routing, 2, timeout=60)
    pattern = (
        r"parameter 0 \('layers.0.weight' on rank 0, 'embed.weight' on rank 1\) is "
        r"orthogonalized in \(16, 8\) tiles on rank 0 and not at all on rank 1"
    )
    assert r0 == r1 and re.search(pattern, r0), r0


def _load(rank, world, placement, how):
    model = _model()
    group = place(model, placement, world)
    opt = DolphinFlow(model.parameters(), ortho_mode="matrix", process_group=group)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    if how == "lr":
        saved["param_groups"][0]["lr"] = (1e-3, 2e-3)[rank]
    elif how == "bad_on_one_rank" and rank == 1:
        saved["param_groups"][0]["beta2"] = 1.5
    elif how == "routing":
        saved["param_groups"][0]["ortho_mode"] = "vector"
    lr_before = opt.param_groups[0]["lr"]
    error, seconds = _attempt(lambda: opt.load_state_dict(saved))
    assert opt.param_groups[0]["lr"] == lr_before  # nothing loaded
    model(torch.ones(2, 8)).sum().backward()
    opt.step()  # the ranks are still in step
    return error, seconds


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(
    "how,pattern",
    [
        ("lr", r"param group 0 'lr' is 0\.001 on rank 0 and 0\.002 on rank 1"),
        ("bad_on_one_rank", r"rank 1: param group 0 of the state_dict: beta2=1\.5 is invalid"),
        ("routing", r"changes how parameter .* is orthogonalized.*fixed at construction"),
    ],
)
def test_load_state_dict_is_refused_on_every_rank(placement, how, pattern):
    _refused_quickly(run_on_ranks(_load, 2, placement, how, timeout=60), pattern)


def _add_group(rank, world):
    model = _model()
    opt = DolphinFlow(model[0].parameters(), process_group=dist.group.WORLD)
    error, _ = _attempt(lambda: opt.add_param_group({"params": list(model[2].parameters())}))
    return error


def test_add_param_group_under_a_process_group_is_refused_on_every_rank():
    r0, r1 = run_on_ranks(_add_group, 2, timeout=60)
    assert r0 == r1 and "add_param_group after construction is not supported" in r0
