"""The factored optimizers on real sharded placements equal the single-process run.

Real gloo ranks (tests/dist.py), W = 2 and 4, through ``process_group=``:

- **FSDP2-aware** (:class:`~shardflow.distributed.sharded.ShardedPlacement`): DTensor
  parameters sharded ``Shard(0)`` by ``distribute_tensor`` (``torch.chunk`` rows: uneven, and
  empty on some ranks for the 3-row, 2-row and 9-element parameters at W = 4), and a model
  sharded by ``fully_shard`` trained with ``loss.backward()`` (FSDP2 reduce-scatters the
  gradients);
- **DDP-aware** (:class:`~shardflow.distributed.sharded.ReplicatedPlacement`): plain parameters,
  each owned by one rank; gradients differ per rank and the optimizer averages them on the owner
  (``grads_reduced=False``), or are already averaged (``grads_reduced=True``, a DDP wrapper).

Tolerances (float64, 5 steps, weights of order 1 moved by ≈ 0.2):

- ``FP64_TOL = 1e-12``: factors are fp64 in a float64 run, so a sharded run differs from one
  process only in the order of the column sums (and, DDP-aware, of the gradient average): a few
  ulps (2.2e-16) per step, amplified at most by Adam's normalization. Measured: ≤ 7.8e-16.
- bf16 weights and bf16 first-moment factors (stochastically rounded from streams keyed by the
  global element index): bit-identical today; a column sum reduced in another order may tip one
  rounding by one bf16 ulp, so at most 2 % of the elements may differ, each by ≤ 2⁻⁷ relative.
- ``fully_shard`` model: gradients are reduce-scattered (sums of per-rank batch means in another
  order), ``FSDP_TOL = 1e-10``.

Checkpoints: a single-process optimizer saved with :func:`shardflow.checkpoint.save` resumes on
4 FSDP2 ranks with :func:`shardflow.checkpoint.load` and continues like the single process
(the declared ``state_layout`` reshards).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank
import torch.distributed as dist
from dist import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from shardflow import checkpoint
from shardflow.checkpoint._comm import SingleComm
from shardflow.distributed.sharded import ReplicatedPlacement, ShardedPlacement
from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy

CLASSES = {"adam": FactoredAdam, "adopt": FactoredAdopt, "prodigy": FactoredProdigy}
SHAPES = [(7, 5), (3, 4, 2), (9,), (2, 3)]  # 3 and 2 rows and 9 elements: empty shards on W=4
STEPS = 5
FP64_TOL = 1e-12
FSDP_TOL = 1e-10

CASES = [
    ("adam", {"lr": 0.05, "ademamix": True, "ademamix_warmup": 3, "orthograd": True}),
    ("adam", {"lr": 0.05, "weight_decay": 0.1, "grams": True}),
    ("adopt", {"lr": 0.05, "atan2": True, "ademamix": True}),
    ("adopt", {"lr": 0.05}),
    ("prodigy", {"d0": 1e-2, "slice_p": 2, "orthograd": True}),
    ("prodigy", {"d0": 1e-2, "groups": True}),
]
MODES = ("fsdp", "ddp", "ddp_reduced")


def _full_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def _groups(params, hyper):
    """With ``groups``: two param groups (one per pair of parameters), the second at half the
    learning rate; on 4 DDP-aware ranks some rank owns nothing of a group."""
    if not hyper.get("groups"):
        return params
    lr = hyper.get("lr", 1.0)
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}]


def _hyper(hyper):
    return {k: v for k, v in hyper.items() if k != "groups"}


def _full_grad(full_param, i, step, rank=0, world=1):
    """``p − 1 + noise``; in DDP-aware mode rank r adds ``c_r·spread`` with ``Σ c_r = 0``, so the
    average over ranks is the single-process gradient."""
    g = torch.Generator().manual_seed(100 + 10 * step + i)
    noise = torch.randn(full_param.shape, generator=g, dtype=torch.float64)
    spread = torch.randn(full_param.shape, generator=g, dtype=torch.float64)
    grad = full_param.double() - 1 + 0.5 * noise + (rank - (world - 1) / 2) * spread
    return grad.to(full_param.dtype)


def _to_bytes(tensors) -> bytes:
    """Results travel as bytes: tensors sent through a queue by a rank that then exits would
    leave the parent holding shared-memory handles to a dead process."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _from_bytes(data):
    return torch.load(io.BytesIO(data))


def _single(kind, hyper, dtype, steps, start=0, params=None, opt=None):
    """One process: ``steps`` steps from ``start``; returns (params, optimizer)."""
    if params is None:
        params = [torch.nn.Parameter(t) for t in _full_params(dtype)]
        opt = CLASSES[kind](_groups(params, hyper), **_hyper(hyper))
    for step in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = _full_grad(p.detach(), i, step)
        opt.step()
    return params, opt


def _sharded_params(mode, dtype, world):
    full = _full_params(dtype)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        return [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in full], mesh
    return [torch.nn.Parameter(t) for t in full], dist.group.WORLD


def _set_sharded_grads(mode, params, step, rank, world):
    for i, p in enumerate(params):
        if mode == "fsdp":
            full = p.full_tensor().detach()
            grad = distribute_tensor(_full_grad(full, i, step), p.device_mesh, [Shard(0)])
        elif mode == "ddp":
            grad = _full_grad(p.detach(), i, step, rank, world)
        else:  # ddp_reduced: every rank already holds the average
            grad = _full_grad(p.detach(), i, step)
        p.grad = grad


def _gathered(params):
    return [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in params]


def _sharded(mode, kind, hyper, dtype, steps, rank, world):
    params, group = _sharded_params(mode, dtype, world)
    opt = CLASSES[kind](_groups(params, hyper), process_group=group, **_hyper(hyper))
    expected = ShardedPlacement if mode == "fsdp" else ReplicatedPlacement
    assert isinstance(opt.placement, expected), type(opt.placement)
    if mode == "ddp_reduced":
        opt.placement.grads_reduced = True
    for step in range(steps):
        _set_sharded_grads(mode, params, step, rank, world)
        opt.step()
    return _gathered(params)


def _ranks_cases(rank, world, mode):
    """Every case on this placement; rank 0 also returns the single-process results (computed
    on the ranks so that the test process never runs torch before forking)."""
    got = [_sharded(mode, k, h, torch.float64, STEPS, rank, world) for k, h in CASES]
    want = [_single(k, h, torch.float64, STEPS)[0] for k, h in CASES] if rank == 0 else None
    return _to_bytes((got, want))


def _assert_all_close(got, want, tol):
    worst = 0.0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=tol, atol=tol)
        worst = max(worst, float((a - b.detach()).abs().max().detach()))
    return worst


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_sharded_placements_give_the_single_process_result(mode, world):
    results = [_from_bytes(r) for r in run_on_ranks(_ranks_cases, world, mode, timeout=60)]
    want = results[0][1]
    for got_cases, _ in results:
        for (kind, hyper), got, expected in zip(CASES, got_cases, want):
            moved = max(
                float((b.detach() - a).abs().max())
                for a, b in zip(_full_params(torch.float64), expected)
            )
            assert moved > 0.05, f"{kind} {hyper}: the reference must move the weights"
            worst = _assert_all_close(got, expected, FP64_TOL)
            print(f"{mode} W={world} {kind} {hyper}: max |Δ| = {worst:.2g}")


def _ranks_bf16(rank, world):
    hyper = {"lr": 0.02, "weight_decay": 0.1, "precision": "sr"}
    got = _sharded("fsdp", "adam", hyper, torch.bfloat16, 6, rank, world)
    want = _single("adam", hyper, torch.bfloat16, 6)[0] if rank == 0 else None
    return _to_bytes((got, want))


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_weights_with_stochastic_rounding_are_world_size_invariant(world):
    """See the module docstring for the bound (bit-identical today)."""
    results = [_from_bytes(r) for r in run_on_ranks(_ranks_bf16, world)]
    want = results[0][1]
    for got, _ in results:
        for a, b in zip(got, want):
            b = b.detach()
            differ = (a.float() - b.float()).abs() > 0
            assert differ.float().mean() <= 0.02
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-7)


# -- a fully_shard model trained by backward ------------------------------------------------------


class Tiny(torch.nn.Module):
    """Odd and tiny row counts: 7 rows, 3 rows (empty shard on 4 ranks), a 1-D gain of 5."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(5, 7, dtype=torch.float64)
        self.gate = torch.nn.Linear(7, 3, bias=False, dtype=torch.float64)
        self.gain = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
        self.down = torch.nn.Linear(3, 5, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.down(torch.tanh(self.gate(torch.tanh(self.up(x * self.gain)))))


def _tiny_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return x, torch.sin(2 * x)


def _train_tiny(kind, hyper, rank=0, world=1, sharded=False):
    torch.manual_seed(0)
    model = Tiny()
    group = None
    if sharded:
        group = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=group)
    opt = CLASSES[kind](model.parameters(), process_group=group, **hyper)
    per = 8 // world
    for step in range(STEPS):
        x, y = _tiny_batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return _gathered(list(model.parameters()))


def _ranks_tiny(rank, world):
    got = [_train_tiny(k, h, rank, world, sharded=True) for k, h in (CASES[0], CASES[4])]
    want = [_train_tiny(k, h) for k, h in (CASES[0], CASES[4])] if rank == 0 else None
    return _to_bytes((got, want))


@pytest.mark.parametrize("world", [2, 4])
def test_a_fully_shard_model_trains_like_one_process(world):
    results = [_from_bytes(r) for r in run_on_ranks(_ranks_tiny, world)]
    want = results[0][1]
    for got, _ in results:
        for g, w in zip(got, want):
            _assert_all_close(g, w, FSDP_TOL)


# -- checkpoints: the declared state layout reshards ------------------------------------------


def _resume(kind, hyper, path, rank, world):
    if rank == 0:  # the single-process run: 3 steps, save, 3 more steps (the expectation)
        params, opt = _single(kind, hyper, torch.float64, 3)
        extra = {"params": [p.tolist() for p in params]}
        checkpoint.save(path, optimizer=opt, extra=extra, process_group=SingleComm())
        _single(kind, hyper, torch.float64, 3, start=3, params=params, opt=opt)
        want = [p.detach() for p in params]
    dist.barrier()
    params, mesh = _sharded_params("fsdp", torch.float64, world)
    opt = CLASSES[kind](params, process_group=mesh, **hyper)
    saved = checkpoint.load(path, optimizer=opt)["params"]
    with torch.no_grad():
        for p, value in zip(params, saved):
            full = torch.tensor(value, dtype=torch.float64)
            p.to_local().copy_(distribute_tensor(full, mesh, [Shard(0)]).to_local())
    for step in range(3, 6):
        _set_sharded_grads("fsdp", params, step, rank, world)
        opt.step()
    return _gathered(params), (want if rank == 0 else None)


RESUME_CASES = [CASES[0], CASES[2], CASES[4]]


def _ranks_resume(rank, world, root):
    runs = [_resume(k, h, f"{root}/{i}", rank, world) for i, (k, h) in enumerate(RESUME_CASES)]
    return _to_bytes(runs)


def test_single_process_checkpoints_resume_on_four_fsdp_ranks(tmp_path):
    """Adam (AdEMAMix, ⊥Grad), Adopt (atan2, AdEMAMix), Prodigy: saved by one process, loaded
    and continued on 4 FSDP2 ranks (uneven and empty shards)."""
    results = [_from_bytes(r) for r in run_on_ranks(_ranks_resume, 4, str(tmp_path))]
    for i in range(len(RESUME_CASES)):
        want = results[0][i][1]
        assert not math.isnan(float(want[0].sum()))
        for runs in results:
            _assert_all_close(runs[i][0], want, FP64_TOL)


# -- Prodigy's d when parameters skip steps -----------------------------------------------------

SKIPS = {2: {1}, 3: {0, 3}, 4: {0, 1, 2}}
"""Step -> indices of the parameters without a gradient at that step (on every rank)."""


def _skipping_run(rank, world):
    """FactoredProdigy where some parameters have no gradient for some steps: on ``world``
    DDP-aware ranks (rank >= 0) or on one process; returns the weights and every copy of d."""
    full = _full_params(torch.float64)
    params = [torch.nn.Parameter(t) for t in full]
    group = dist.group.WORLD if world > 1 else None
    opt = FactoredProdigy(params, d0=1e-2, slice_p=2, process_group=group)
    for step in range(STEPS + 1):
        for i, p in enumerate(params):
            skip = i in SKIPS.get(step, ())
            p.grad = None if skip else _full_grad(p.detach(), i, step, max(rank, 0), world)
        opt.step()
    return _to_bytes(([p.detach() for p in params], [float(opt.state[p]["d"]) for p in params]))


def _skipping_ranks(rank, world):
    single = _skipping_run(-1, 1) if rank == 0 else None
    return _skipping_run(rank, world), single


@pytest.mark.parametrize("world", [2, 4])
def test_prodigy_d_stays_fresh_on_ddp_ranks_when_parameters_skip_steps(world):
    """Every rank keeps every parameter's copy of d equal to the one-process d of the group (a
    "replicated" state: checkpoints save it per parameter). The bug: a copy was written only by
    the rank that stepped the parameter, so copies went stale on the other ranks and for
    parameters without a gradient, and a rank whose stepped parameters were all stale read an
    old d."""
    results = run_on_ranks(_skipping_ranks, world, timeout=60)
    want, want_d = _from_bytes(results[0][1])
    for rank_result, _ in results:
        got, got_d = _from_bytes(rank_result)
        _assert_all_close(got, want, FP64_TOL)
        assert got_d == pytest.approx(want_d, rel=FP64_TOL)
        assert len(set(got_d)) == 1  # one d per group, in every parameter's copy
