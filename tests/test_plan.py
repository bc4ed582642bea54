"""The owner plan: deterministic, complete, balanced (LPT), tiles as units, printable; the dry run
prints the plan the optimizer uses."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from dist import run_on_ranks

from shardflow.distributed.plan import (
    OwnerPlan,
    Unit,
    assign,
    ns_cost,
    tile_units,
    tiles,
    whole_unit,
)
from shardflow.train.config import load_config
from shardflow.train.groups import route_params
from shardflow.train.loop import build_model, build_model_and_optimizer
from shardflow.train.placement import process_group_for
from shardflow.train.plan import dry_run, owner_plan, plan_optimizer


def llama3_8b_hidden_shapes() -> list[tuple[int, int]]:
    """The orthogonalized matrices of Llama-3-8B (hidden 4096, MLP 14336, 8 KV heads, 32 layers)."""
    h, f, kv = 4096, 14336, 1024
    layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    return layer * 32


def test_ns_cost_is_m_n_min():
    assert ns_cost(3, 5) == 3 * 5 * 3
    assert ns_cost(7, 2) == 7 * 2 * 2


def test_tiles_cover_the_matrix_exactly_once_with_ragged_edges():
    cover = [[0] * 10 for _ in range(7)]
    for (r0, r1), (c0, c1) in tiles(7, 10, (4, 4)):
        for r, c in itertools.product(range(r0, r1), range(c0, c1)):
            cover[r][c] += 1
    assert all(v == 1 for row in cover for v in row)
    assert len(tiles(7, 10, (4, 4))) == 2 * 3


def test_plan_is_deterministic_and_every_unit_has_one_owner():
    units = [whole_unit(i, (m, n), (m, n)) for i, (m, n) in enumerate([(5, 3), (8, 8), (2, 9)] * 5)]
    owners = assign(units, 4)
    assert owners == assign(list(units), 4)
    assert len(owners) == len(units) and set(owners) <= set(range(4))


def test_lpt_balances_ns_cost_and_breaks_ties_by_elements():
    units = [Unit(i, (0, 4), (0, 4), 64.0, 16) for i in range(8)]
    plan = OwnerPlan(4, units)
    assert plan.ns_loads() == [128.0] * 4 and plan.counts() == [2] * 4
    # zero-cost units (element-wise parameters) even out the element counts
    units = [Unit(0, (0, 10), (0, 10), 1000.0, 100)] + [
        Unit(i, (0, 1), (0, 25), 0.0, 25) for i in range(1, 5)
    ]
    plan = OwnerPlan(2, units)
    assert plan.elements() == [100, 100]


def test_lpt_stays_within_four_thirds_of_a_lower_bound():
    costs = [ns_cost(m, n) for m, n in [(9, 7), (5, 5), (12, 3), (8, 8), (4, 11), (6, 6)] * 3]
    units = [Unit(i, (0, 1), (0, 1), c, 1) for i, c in enumerate(costs)]
    for world in (2, 3, 5):
        loads = OwnerPlan(world, units).ns_loads()
        bound = max(sum(costs) / world, max(costs))
        assert max(loads) <= 4 / 3 * bound + 1e-9


def test_block_tiles_let_more_ranks_than_matrices_share_the_work():
    shapes = [(64, 64), (64, 96)]
    whole = OwnerPlan(8, [whole_unit(i, s, s) for i, s in enumerate(shapes)])
    assert sum(load > 0 for load in whole.ns_loads()) == 2
    tiled = OwnerPlan(8, [u for i, s in enumerate(shapes) for u in tile_units(i, s, (16, 16))])
    assert all(load > 0 for load in tiled.ns_loads())
    assert tiled.ns_imbalance() <= 1.10


def test_describe_lists_every_rank_with_its_load():
    plan = OwnerPlan(3, [whole_unit(i, (4, 4), (4, 4)) for i in range(4)])
    text = plan.describe("params", names={i: f"w{i}" for i in range(4)})
    for r in range(3):
        assert f"\n{r:>5} " in text
    assert "max/mean: NS load 1.500" in text
    assert "w0" in text and "w3" in text


@pytest.mark.parametrize(("world", "target"), [(8, 1.10), (64, 1.25)])
def test_llama3_8b_matrix_plan_meets_the_imbalance_targets(world, target):
    shapes = llama3_8b_hidden_shapes()
    plan = OwnerPlan(world, [whole_unit(i, s, s) for i, s in enumerate(shapes)])
    assert plan.ns_imbalance() <= target


# -- the dry run prints the plan the optimizer uses ------------------------------------------

PLAN_CASES = [
    ("ddp", {"ortho_mode": "matrix"}),
    ("ddp", {"ortho_mode": "vector"}),  # no Newton-Schulz: every unit ties on cost, by elements
    ("fsdp", {"ortho_mode": "matrix"}),
    ("fsdp", {"ortho_mode": "block", "block_size": 48}),  # ragged 48/16 tiles: many equal costs
]


def plan_config(kind: str, hyper: dict):
    """A small 2-rank run config (the quickstart's groups: embeddings, head and norms
    element-wise, the rest as ``hyper`` says)."""
    args = ["--run.nproc", "2", "--run.device", "cpu", "--placement.kind", kind]
    args += ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4"]
    args += ["--model.n_kv_heads", "2", "--model.ffn_dim", "128"]
    for key, value in hyper.items():
        args += [f"--optim.hyper.{key}", str(value)]
    return load_config(Path(__file__).parent.parent / "configs" / "quickstart.toml", args)


def _real_plans(rank, world):
    """On each rank: the owners and the printed plan of the run's real optimizer."""
    out = []
    for kind, hyper in PLAN_CASES:
        cfg = plan_config(kind, hyper)
        mesh = process_group_for(cfg, torch.device("cpu"))
        _, opt, groups = build_model_and_optimizer(cfg, torch.device("cpu"), mesh)
        plan = opt.placement.plan
        names = dict(enumerate(n for g in groups for n in g.names))
        unit = "params" if kind == "ddp" else "NS units"
        out.append((list(plan.owners), [u.cost for u in plan.units], plan.describe(unit, names)))
    return out


def test_dry_run_prints_the_owner_plan_the_optimizer_uses():
    """For DDP and FSDP2 runs, in matrix, block and element-wise modes: the owners the dry run
    computes (and the table it prints) are the real optimizer's, on 2 gloo ranks. Every case
    has ties (units of equal cost), so the tie-breaks must be the library's too."""
    r0, r1 = run_on_ranks(_real_plans, 2, timeout=180)
    assert [o for o, _, _ in r0] == [o for o, _, _ in r1], "the ranks' plans must agree"
    for (kind, hyper), (owners, costs, table) in zip(PLAN_CASES, r0):
        assert len(set(costs)) < len(costs), (kind, hyper, "no tie in this case")
        cfg = plan_config(kind, hyper)
        groups = route_params(build_model(cfg, "meta").named_parameters(), cfg.optim.groups)
        plan, _ = owner_plan(cfg, plan_optimizer(cfg, groups))
        assert plan.owners == owners, (kind, hyper)
        assert [u.cost for u in plan.units] == costs
        printed = "\n".join("  " + line for line in table.splitlines())
        assert printed in dry_run(cfg), (kind, hyper)
