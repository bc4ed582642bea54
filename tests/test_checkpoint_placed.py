"""Every optimizer in the table, through the real placements: save at W=2, load at 1, 2 and 4.

For each record of ``tests/optim_table.py`` (a later optimizer joins by adding its record), on a
model with uneven shards and an empty one at W=4 (rows 10 and 3):

- at W=2, under FSDP2 (``fully_shard``: ``ShardedPlacement``, row state as DTensors) and under the
  DDP owner plan (``ReplicatedPlacement``: owners hold the state, others 0-row placeholders):
  3 steps, save; 2 more steps (the uninterrupted run); a fresh model and optimizer load the
  checkpoint and take the same 2 steps — **bitwise** equal to the uninterrupted run;
- at W=4, each checkpoint loads into the other placement (FSDP2 rows → whole parameters on their
  owners; owners' whole parameters → FSDP2 rows), and in one plain process; 2 steps each,
  compared with the single-process run of 5 steps within the sharding tolerance below. (Row
  pieces that straddle the new shard boundaries, FSDP2 W=2 → W=4, do not depend on the
  optimizer: tests/test_checkpoint_sharded.py and test_checkpoint_reshard.py cover them.)

This covers every kind of state: dense fp32 (DolphinFlow), bf16 moments and a projected second
moment whose projection is regenerated from the group's seed (WhiteFlow, only the seed is
saved), packed 1-bit signs with row/column factors (the factored optimizers), 8-bit codes with
absmax scales (DolphinFlow8bit).

Tolerance at another world size or placement: the runs differ from one process only in the
order of floating-point sums (gradients averaged over ranks, norms summed per shard).

- State all in fp32 (or wider): ``rtol=1e-5, atol=1e-6`` (as tests/test_sharding.py), a few ulps
  of weights of order 1. Measured: at most 3e-8.
- State stored in fewer bits (bf16, 8-bit codes, packed signs: any state tensor of a dtype
  narrower than fp32): a last-bit difference that crosses a rounding boundary of the stored value
  moves that element's update by one stored step, at most ``2⁻⁷`` of the update (bf16 keeps 8
  significant bits; an 8-bit code is 1/127 of its block's absmax), so per element
  ``atol = 2⁻⁷ · max|w_ref − w₀|`` (the largest move of that parameter over the run bounds any
  one update). Measured: 3e-8, and 4.3e-5 for WhiteFlow once a bf16 rounding flipped (bound
  1.4e-3).

Lost or misplaced state (a reset moment, another rank's rows) changes the weights by the size of
an update per element: 25× (5 steps) above the looser bound.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank (seconds each)
from dist import place, run_on_ranks
from optim_table import all_records, skip_reason

import shardflow.checkpoint as ck

pytest.importorskip("shardflow.distributed.sharded")

BATCH, STEPS_BEFORE, STEPS_AFTER = 8, 3, 2
CONFIG_CHOICE = {"WhiteFlow": 1}
"""Which of a record's configs to run (default: its first). WhiteFlow's second uses rank 4 and
refreshes its projection every 2 steps, so a refresh falls after the checkpoint."""
PLACEMENTS = ("fsdp", "ddp")
TOL = dict(rtol=1e-5, atol=1e-6)


def _config(record) -> dict:
    return record.configs[CONFIG_CHOICE.get(record.name, 0)]


def _by_name(name: str):
    (record,) = [r for r in all_records() if r.name == name]
    return record


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _train(model, opt, steps, start=0, rank=0, world=1):
    """Steps ``start+1 ..``: each rank takes its slice of the step's batch."""
    for step in range(start + 1, start + steps + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        opt.step()


def _full(model) -> dict[str, list]:
    """Whole parameters as lists (exact for fp32; lists travel back from a rank by value)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
        for n, p in model.named_parameters()
    }


def _placed(record, placement: str, world: int):
    model = _model()
    group = place(model, placement, world)
    return model, record.factory(model.parameters(), process_group=group, **_config(record))


def _save_at_two(rank, world, name, paths):
    """Per placement: save after 3 steps, the uninterrupted run, and a resume in a fresh copy."""
    record = _by_name(name)
    out = {}
    for placement in PLACEMENTS:
        model, opt = _placed(record, placement, world)
        _train(model, opt, STEPS_BEFORE, rank=rank, world=world)
        ck.save(paths[placement], model=model, optimizer=opt, extra={"step": STEPS_BEFORE})
        _train(model, opt, STEPS_AFTER, start=STEPS_BEFORE, rank=rank, world=world)
        resumed, resumed_opt = _placed(record, placement, world)
        assert ck.load(paths[placement], model=resumed, optimizer=resumed_opt) == {
            "step": STEPS_BEFORE
        }
        _train(resumed, resumed_opt, STEPS_AFTER, start=STEPS_BEFORE, rank=rank, world=world)
        out[placement] = (_full(model), _full(resumed))
    return out


def _load_at(rank, world, name, paths):
    """Each checkpoint into the other placement at this world size, then 2 steps."""
    record = _by_name(name)
    out = {}
    for saved, placement in zip(PLACEMENTS, reversed(PLACEMENTS)):
        model, opt = _placed(record, placement, world)
        ck.load(paths[saved], model=model, optimizer=opt)
        _train(model, opt, STEPS_AFTER, start=STEPS_BEFORE, rank=rank, world=world)
        out[(saved, placement)] = _full(model)
    return out


def _low_precision(opt) -> bool:
    """Whether any state tensor is stored in fewer bits than fp32."""
    return any(
        isinstance(v, torch.Tensor) and v.ndim and v.element_size() < 4
        for state in opt.state.values()
        for v in state.values()
    )


def _close(got: dict, expected: dict, start: dict, low_precision: bool, what: str) -> None:
    for name, value in expected.items():
        tol = TOL
        if low_precision:
            tol = dict(rtol=0, atol=max(1e-6, 2**-7 * float((value - start[name]).abs().max())))
        torch.testing.assert_close(
            torch.tensor(got[name]), value, **tol, msg=lambda m: f"{what}: {m}"
        )


@pytest.mark.parametrize("record", all_records(), ids=lambda r: r.name)
def test_every_optimizer_resumes_across_placements_and_world_sizes(record, tmp_path):
    if skip_reason(record):
        pytest.skip(skip_reason(record))
    reference = _model()  # first: the ranks inherit its imports (bitsandbytes...)
    ref_opt = record.factory(reference.parameters(), **_config(record))
    _train(reference, ref_opt, STEPS_BEFORE + STEPS_AFTER)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    start = {n: p.detach() for n, p in _model().named_parameters()}
    low = _low_precision(ref_opt)

    paths = {p: tmp_path / p for p in PLACEMENTS}
    at_two = run_on_ranks(_save_at_two, 2, record.name, paths)[0]
    for placement, (uninterrupted, resumed) in at_two.items():
        assert resumed == uninterrupted, f"{placement}: resume at the same W is not bitwise exact"
    for placement, (uninterrupted, _) in at_two.items():
        _close(uninterrupted, expected, start, low, f"W=2 {placement} vs one process")

    for (saved, placement), got in run_on_ranks(_load_at, 4, record.name, paths)[0].items():
        _close(got, expected, start, low, f"{saved}@2 -> {placement}@4")
    for name, record_ in ck.read_index(paths["ddp"])["tensors"].items():
        if name.startswith("optim/"):  # owner-only state: written once, by its owner
            assert len(record_["pieces"]) == 1, name
    for saved in PLACEMENTS:
        one = _model()
        one_opt = record.factory(one.parameters(), **_config(record))
        ck.load(paths[saved], model=one, optimizer=one_opt)
        _train(one, one_opt, STEPS_AFTER, start=STEPS_BEFORE)
        _close(_full(one), expected, start, low, f"{saved}@2 -> one process")
