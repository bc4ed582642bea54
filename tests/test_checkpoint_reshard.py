"""Resharding, simulated: W ranks' slices in one process (threads), saved, loaded at W′.

Every kind of state (``KindsOpt``: dense, packed 1-bit signs, row and column factors, seeded
low-rank projections, 8-bit codes with block scales, a JSON counter) is saved from FSDP2-style row
shards or DDP-style whole-parameter owners at W ranks and loaded at W′ (2→1, 1→2, 2→4, 4→2, 3→2)
into either placement or a plain single process; each rank must then hold exactly the reference's
slices, and non-owners' placeholder state must be neither written nor touched. The real
multi-process runs are in ``test_checkpoint_dist.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_checkpoint_kinds import KindsOpt, build_rank, scatter_state

import shardflow.checkpoint as ck


class ThreadGroup:
    """An in-process stand-in for a process group: ``all_gather`` between threads."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[Any] = [None] * world_size


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_gather(self, obj: Any) -> list[Any]:
        self.group.slots[self.rank] = obj
        self.group.barrier.wait()
        out = list(self.group.slots)
        self.group.barrier.wait()
        return out


def on_threads(world_size: int, fn: Callable[[int, ThreadComm], Any]) -> list[Any]:
    """Run ``fn(rank, comm)`` on ``world_size`` threads; re-raise the first rank's error."""
    group = ThreadGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadComm(group, rank))
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    root = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if root or any(errors):
        raise (root or [e for e in errors if e is not None])[0]
    return results


def _reference():
    """A single-process KindsOpt after 3 steps; the last weight has 3 rows (empty shards at W=4)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    named = list(model.named_parameters())
    opt = KindsOpt(named, lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
    return named, opt


def _save(path, named, reference, kind: str, world_size: int) -> None:
    if world_size == 1:
        ck.save(path, optimizer=reference)
        return

    def rank(r, comm):
        opt, params = build_rank(named, kind, r, world_size)
        scatter_state(reference, named, opt, params)
        ck.save(path, optimizer=opt, process_group=comm)

    on_threads(world_size, rank)


def _check_rank(opt, params, named, reference) -> None:
    placement = opt.placement
    for (name, ref_p), (_, p) in zip(named, params):
        rows = placement.row_range(p) if placement.owns(p) else None
        for key, ref in reference.state[ref_p].items():
            got = opt.state[p][key]
            if rows is None:  # a non-owner's placeholder: never loaded into
                if isinstance(got, torch.Tensor) and got.is_floating_point():
                    assert got.isnan().all(), (name, key)
                continue
            if not isinstance(ref, torch.Tensor):
                assert got == ref, (name, key)
                continue
            if KindsOpt.state_layout[key] == "rows" and ref.ndim:
                ref = ref[rows[0] : rows[1]]
            assert got.dtype == ref.dtype and torch.equal(got, ref), (name, key, rows)


PAIRS = [(2, 1), (1, 2), (2, 4), (4, 2), (3, 2)]


@pytest.mark.parametrize("saved_as", ["fsdp", "ddp"])
@pytest.mark.parametrize("loaded_as", ["fsdp", "ddp"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}to{p[1]}")
def test_every_state_kind_reshards(saved_as, loaded_as, pair, tmp_path):
    world, new_world = pair
    named, reference = _reference()
    _save(tmp_path / "ck", named, reference, saved_as, world)
    index = ck.read_index(tmp_path / "ck")
    assert index["world_size"] == world and len(index["files"]) == world
    if new_world == 1:
        fresh = [(n, torch.nn.Parameter(torch.zeros_like(p))) for n, p in named]
        opt = KindsOpt(fresh, lr=0.5)
        ck.load(tmp_path / "ck", optimizer=opt)
        _check_rank(opt, fresh, named, reference)
        assert opt.param_groups[0]["lr"] == 1e-2
        return

    def rank(r, comm):
        opt, params = build_rank(named, loaded_as, r, new_world, lr=0.5)
        ck.load(tmp_path / "ck", optimizer=opt, process_group=comm)
        _check_rank(opt, params, named, reference)

    on_threads(new_world, rank)


def test_replicated_copies_are_written_once_and_shared_out(tmp_path):
    named, reference = _reference()
    _save(tmp_path / "ck", named, reference, "ddp", 2)
    index = ck.read_index(tmp_path / "ck")
    for record in index["tensors"].values():
        assert len(record["pieces"]) == 1  # whole parameters: one owner, one piece
    files = {p[0] for r in index["tensors"].values() for p in r["pieces"]}
    assert len(files) == 2  # both ranks wrote a share


def test_a_row_nobody_holds_is_refused_on_every_rank(tmp_path):
    named, reference = _reference()

    def rank(r, comm):
        opt, params = build_rank(named, "ddp", r, 2)
        scatter_state(reference, named, opt, params)
        opt.placement.ranges[params[0][1]] = None  # nobody owns 0.weight: its state would be lost
        with pytest.raises(
            ck.CheckpointError, match=r"state of \['0\.weight'\] is held by no rank"
        ):
            ck.save(tmp_path / "ck", optimizer=opt, process_group=comm)

    on_threads(2, rank)
    assert list(tmp_path.iterdir()) == []


def test_rows_of_a_parameter_nobody_holds_are_refused(tmp_path):
    named, reference = _reference()

    def rank(r, comm):
        opt, params = build_rank(named, "fsdp", r, 2)
        scatter_state(reference, named, opt, params)
        if r == 1:  # rank 1 claims nothing of 0.weight: rows 5..10 would be lost
            opt.placement.ranges[params[0][1]] = None
        with pytest.raises(
            ck.CheckpointError,
            match=r"optim/0\.weight/\w+: rows \[5, 10\) of 10 are held by no rank",
        ):
            ck.save(tmp_path / "ck", optimizer=opt, process_group=comm)

    on_threads(2, rank)


def test_replicated_state_that_differs_between_ranks_is_refused(tmp_path):
    named, reference = _reference()

    def rank(r, comm):
        opt, params = build_rank(named, "fsdp", r, 2)
        scatter_state(reference, named, opt, params)
        if r == 1:
            opt.state[params[0][1]]["col_sq"] += 1
        with pytest.raises(
            ck.CheckpointError,
            match=r"col_sq is declared 'replicated' but differs between ranks \[0, 1\]",
        ):
            ck.save(tmp_path / "ck", optimizer=opt, process_group=comm)

    on_threads(2, rank)


def test_a_wrong_rows_declaration_is_refused(tmp_path):
    class Wrong(KindsOpt):
        state_layout = {**KindsOpt.state_layout, "col_sq": "rows"}

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10)
    with pytest.raises(
        ck.CheckpointError,
        match=r"'col_sq' of weight is declared 'rows' but has 6 rows where this rank holds rows \[0, 10\)",
    ):
        ck.save(tmp_path / "ck", model=model, optimizer=Wrong(model.parameters()))


def test_a_refusal_on_one_rank_stops_every_rank(tmp_path):
    named, reference = _reference()
    _save(tmp_path / "ck", named, reference, "fsdp", 2)
    file = tmp_path / "ck" / "rank-00001-of-00002.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))

    def rank(r, comm):
        opt, params = build_rank(named, "fsdp", r, 2)
        before = {
            k: v.clone() for k, v in opt.state[params[0][1]].items() if isinstance(v, torch.Tensor)
        }
        with pytest.raises(
            ck.CheckpointError, match=r"rank-00001-of-00002\.safetensors' is corrupted"
        ):
            ck.load(tmp_path / "ck", optimizer=opt, process_group=comm)
        after = opt.state[params[0][1]]
        assert all(torch.equal(before[k], after[k]) for k in before)

    on_threads(2, rank)
