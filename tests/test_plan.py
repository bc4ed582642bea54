"""The owner plan: deterministic, complete, balanced (LPT), tiles as units, printable."""

from __future__ import annotations

import itertools

import pytest

from shardflow.distributed.plan import (
    OwnerPlan,
    Unit,
    assign,
    ns_cost,
    tile_units,
    tiles,
    whole_unit,
)


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
