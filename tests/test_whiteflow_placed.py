"""WhiteFlow under the real placements (gloo, CPU) equals the single-process run; checkpoints.

- FSDP2 (``ShardedPlacement``: DTensor params, ``fully_shard``, Shard(0)) and the DDP-aware owner
  plan (``ReplicatedPlacement``: plain params, with and without a DDP wrapper) on 2 and 4 ranks.
  The model has a 13-row matrix (uneven shards: 7+6, 4+4+4+1) and a 3-row one (an empty shard at
  4 ranks). Each rank sees its slice of the batch.
- ``shardflow.checkpoint``: saved at W=2 (FSDP2), loaded at W=4 and W=1, continued; only the
  seed is saved (no projection tensor); saving never generates a projection.

Tolerances (weights of order 0.3, moved ≈ 0.2 by 7 steps at lr 3e-2):

- **float64** params keep float64 states (no bf16 rounding): the runs differ from one process
  only in the order of floating-point sums (gradients averaged over ranks, the clipping norm
  summed per shard), a few ulps (1e-16) per step: ``rtol=1e-10, atol=1e-12``.
- **float32** params keep bf16 states. Their rounding draws the same bits for the same global
  element on any world size, but an fp32 input a few ulps off (the sums above) lands on the
  other bf16 neighbour with probability ≈ ulps/2¹⁶. A flip changes one state element by one bf16
  ulp (2⁻⁸ relative), hence its row's channel scale and that row's update by ≤ ``lr·2⁻⁸`` per
  remaining step: every weight must stay within ``FLIP_BOUND = STEPS·lr·2⁻⁸ ≈ 8e-4`` (measured
  after 7 steps on 2 ranks: one row off by up to 2.2e-4, identically under all three placements;
  ≤ 9e-8 everywhere over the first 4 steps). A placement bug (wrong rows, a missing reduction,
  a wrong rounding offset) moves weights by O(lr) = 3e-2.
- Checkpoint resumes (float32) are held to ``FLIP_BOUND`` too; at the same world size the resumed
  run equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist import run_on_ranks

import shardflow.checkpoint as ck
import shardflow.ops.projection as projection_module
from shardflow.optim.whiteflow import WhiteFlow

BATCH, STEPS = 32, 7
TOL = dict(rtol=1e-5, atol=1e-6)
TOL64 = dict(rtol=1e-10, atol=1e-12)
FLIP_BOUND = STEPS * 3e-2 * 2**-8
CONFIGS = {
    "projected-limiter": dict(lr=3e-2, rank=8, proj_update_freq=3, norm_growth_limit=1.01),
    "dense-shape-lr": dict(lr=3e-2, second_moment="dense", shape_lr_scaling=True),
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 13),  # 13 rows: uneven at 2 and 4 ranks
        torch.nn.Tanh(),
        torch.nn.Linear(13, 3),  # 3 rows: an empty shard at 4 ranks
    ).to(dtype)


def _train(model, opt, steps, start=0, rank=0, world=1):
    for step in range(start + 1, start + steps + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 24, generator=g), torch.randn(BATCH, 3, generator=g)
        x, y = x.to(opt.param_groups[0]["params"][0].dtype), y.to(x.dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        opt.step()


def _full(model) -> dict[str, list]:
    """Whole parameters as lists (tensors do not outlive a rank's process)."""
    return {
        n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
        .detach()
        .tolist()
        for n, p in model.named_parameters()
    }


def _placed(kind, world, config, dtype=torch.float32):
    """The model (as trained) and its optimizer under placement ``kind``."""
    model = _model(dtype)
    inner = model
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        group = mesh
    else:
        group = dist.group.WORLD
        if kind == "ddp_wrapped":
            model = torch.nn.parallel.DistributedDataParallel(model)
    opt = WhiteFlow(list(inner.named_parameters()), process_group=group, **config)
    if kind == "ddp_wrapped":
        opt.placement.grads_reduced = True
    return model, opt


def _reference(config, steps, dtype=torch.float32):
    model = _model(dtype)
    opt = WhiteFlow(list(model.named_parameters()), **config)
    _train(model, opt, steps)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _close(got, expected, what, tol=TOL):
    diffs = torch.cat([(torch.tensor(got[n]) - v).abs().flatten() for n, v in expected.items()])
    if tol is None:  # bf16 states: every element within the flip bound (see the docstring)
        assert diffs.max() <= FLIP_BOUND, f"{what}: max |Δ| = {diffs.max():.2g} > {FLIP_BOUND:.2g}"
        return
    for name, value in expected.items():
        got_t = torch.tensor(got[name], dtype=value.dtype)
        diff = (got_t - value).abs().max().item()
        torch.testing.assert_close(got_t, value, **tol, msg=f"{what} {name}: max |Δ| = {diff:.2g}")


def _runs(rank, world):
    out = {}
    for dtype in (torch.float64, torch.float32):
        for kind in ("fsdp", "ddp_unwrapped", "ddp_wrapped"):
            for name, config in CONFIGS.items():
                model, opt = _placed(kind, world, config, dtype)
                _train(model, opt, STEPS, rank=rank, world=world)
                out[(dtype, kind, name)] = _full(model)
    return out if rank == 0 else None


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_and_owner_plan_equal_one_process(world):
    results = run_on_ranks(_runs, world, timeout=240)[0]
    start = {n: p.detach() for n, p in _model().named_parameters()}
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, None)):
        for name, config in CONFIGS.items():
            expected = _reference(config, STEPS, dtype)
            moved = max((expected[n].float() - start[n]).abs().max().item() for n in start)
            assert moved > 0.1, "the reference run must move the weights"
            for kind in ("fsdp", "ddp_unwrapped", "ddp_wrapped"):
                what = f"W={world} {dtype} {kind} {name}"
                _close(results[(dtype, kind, name)], expected, what, tol)


# -- checkpoints ------------------------------------------------------------------------------

CK_CONFIG = dict(CONFIGS["projected-limiter"], projection_device="cpu")


def _ck_run(rank, world, load_from, save_to, steps, start):
    model, opt = _placed("fsdp", world, CK_CONFIG)
    if load_from is not None:
        assert ck.load(load_from, model=model, optimizer=opt) == {"step": start}
    _train(model, opt, steps, start=start, rank=rank, world=world)
    if save_to is not None:
        cached = opt.projections.tensors()
        assert cached and all(p.device.type == "cpu" for p in cached)
        original = projection_module.projection

        def refuse(*args, **kwargs):
            raise AssertionError("saving a checkpoint generated a projection")

        projection_module.projection = refuse
        try:
            ck.save(save_to, model=model, optimizer=opt, extra={"step": start + steps})
        finally:
            projection_module.projection = original
        assert opt.projections.tensors() == cached  # nothing new materialized, nothing moved
    return _full(model)


def test_checkpoint_saved_at_2_resumes_at_4_and_1_with_only_the_seed(tmp_path):
    a = tmp_path / "a"
    run_on_ranks(_ck_run, 2, None, a, 3, 0)
    index = ck.read_index(a)
    optim_keys = [k for k in index["tensors"] if k.startswith("optim/")]
    # Only the state keys of WhiteFlow.state_layout, each with the param's rows (or 0-d): no
    # projection (a width × rank matrix) is ever written; it is regenerated from the seed.
    assert optim_keys and {k.rsplit("/", 1)[1] for k in optim_keys} <= set(WhiteFlow.state_layout)
    for key in optim_keys:
        shape = index["tensors"][key]["shape"]
        assert shape == [] or shape[0] in (13, 3), (key, shape)
    expected = _reference(CK_CONFIG, 5)
    same = run_on_ranks(_ck_run, 2, a, None, 2, 3)[0]
    uninterrupted = run_on_ranks(_ck_run, 2, None, None, 5, 0)[0]
    assert same == uninterrupted  # bitwise at the same world size
    _close(run_on_ranks(_ck_run, 4, a, None, 2, 3)[0], expected, "2 → 4", None)
    one = _model()
    one_opt = WhiteFlow(list(one.named_parameters()), **CK_CONFIG)
    assert ck.load(a, model=one, optimizer=one_opt) == {"step": 3}
    assert one_opt.param_groups[0]["seed"] == CK_CONFIG.get("seed", 0)
    assert one_opt.projection_bytes() == 0  # loading regenerates nothing either
    _train(one, one_opt, 2, start=3)
    _close(_full(one), expected, "2 → 1", None)
