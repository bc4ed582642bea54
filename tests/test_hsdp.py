"""HSDP: every optimizer on a 2-D ("replicate", "shard") mesh, as ``fully_shard(mesh=mesh2d)``
shards it, on 4 gloo ranks (2 replicas x 2 shards), fork start, free ports.

- FSDP2's HSDP on gloo/CPU is real: after ``backward`` the gradient shards are the average over
  all 4 ranks' batch slices (reduce-scatter in the shard group, all-reduce across replicas) and
  bitwise equal on the two replicas of each shard.
- For each record of ``tests/optim_table.py`` (its first config) and the Newton-Schulz modes of
  DolphinFlow and DolphinFlow8bit (block and matrix: the owner plan's all-to-alls), 5 steps:
  HSDP 2x2 equals one process and equals 1-D FSDP2 at W=4, all three fed the same gradient (the
  HSDP run's, gathered each step) so that they differ only in the order of floating-point sums
  (norms and ⊥Grad sums per shard), the tolerance of tests/test_checkpoint_placed.py (``rtol
  1e-5, atol 1e-6``; state narrower than fp32: one stored step of the largest update). Measured
  (fp32 wire, 5 steps, weights moved 9e-3 .. 0.15): 0 for DolphinFlow, DolphinFlow8bit and
  WhiteFlow, at most 3e-8 for the factored optimizers.
- The replicas agree bit for bit: weights and every state tensor on rank 0 == rank 2 and rank 1
  == rank 3.
- Every collective of ``optimizer.step()`` runs inside the shard group: nothing crosses replicas
  (nodes), Newton-Schulz included.
- A 2-D mesh whose shard dimension is not the parameters' is the same clear error on every rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank (seconds each)
import torch.distributed as dist
from dist import run_on_ranks
from optim_table import all_records, skip_reason

pytest.importorskip("shardflow.distributed.sharded")

BATCH, STEPS = 8, 5
TOL = dict(rtol=1e-5, atol=1e-6)
EXTRA = [("DolphinFlow", 2), ("DolphinFlow", 3), ("DolphinFlow8bit", 2)]
"""Newton-Schulz configs (block, matrix) run besides every record's first config."""


def _cases() -> list[tuple[str, int]]:
    return [(r.name, 0) for r in all_records()] + EXTRA


def _record(name: str):
    (record,) = [r for r in all_records() if r.name == name]
    return record


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _mesh(world: int, hsdp: bool):
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    if hsdp:
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,))


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def _loss(model, step, rank, world):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world])


def _full(model) -> dict[str, np.ndarray]:
    return {n: p.full_tensor().detach().numpy().copy() for n, p in model.named_parameters()}


def _local(opt, model) -> list[bytes]:
    """This rank's weights and state tensors, as bytes (for bitwise replica comparison)."""
    out = [
        p.to_local().detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for p in model.parameters()
    ]
    for p in model.parameters():
        for key in sorted(opt.state[p]):
            v = opt.state[p][key]
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v
                out.append(
                    key.encode()
                    + v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                )
    return out


def _groups_of_step(opt) -> set[tuple[int, ...]]:
    """The rank sets of the groups every collective of one ``opt.step()`` runs in."""
    seen: set[tuple[int, ...]] = set()
    names = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "broadcast")
    saved = {n: getattr(dist, n) for n in names}

    def spy(fn):
        def call(*args, group=None, **kwargs):
            seen.add(tuple(dist.get_process_group_ranks(group or dist.group.WORLD)))
            return fn(*args, group=group, **kwargs)

        return call

    for n, fn in saved.items():
        setattr(dist, n, spy(fn))
    try:
        opt.step()
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return seen


def _run(rank, world, cases):
    """Per case: HSDP 2x2 with real backward (recording its gradients), 1-D FSDP2 at W=4 and
    one process fed those gradients; the replicas' bytes; the groups the steps used."""
    from shardflow.distributed.sharded import ShardedPlacement  # noqa: PLC0415

    mesh2d, mesh1d = _mesh(world, True), _mesh(world, False)
    out = {}
    for name, ci in cases:
        record = _record(name)
        config = record.configs[ci]
        model = _sharded(mesh2d)
        opt = record.factory(model.parameters(), process_group=mesh2d, **config)
        assert isinstance(opt.placement, ShardedPlacement)
        opt.placement.wire_dtype = torch.float32
        grads, groups, grad_ok = [], set(), True
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            _loss(model, step, rank, world).backward()
            full = {n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}
            grads.append(full)
            if step == 1:  # FSDP2's HSDP gradient: the mean over all 4 ranks' slices
                ref = _model()
                for r in range(world):
                    (_loss(ref, step, r, world) / world).backward()
                grad_ok = all(
                    torch.allclose(full[n], p.grad, rtol=1e-6, atol=1e-7)
                    for n, p in ref.named_parameters()
                )
            groups |= _groups_of_step(opt)
        hsdp = _full(model)
        # 1-D FSDP2 at W=4, fed the same gradients
        flat = _sharded(mesh1d)
        flat_opt = record.factory(flat.parameters(), process_group=mesh1d, **config)
        flat_opt.placement.wire_dtype = torch.float32
        for step in range(STEPS):
            flat_opt.zero_grad()
            _loss(flat, step + 1, rank, world).backward()
            for n, p in flat.named_parameters():
                local = p.grad.to_local()
                lo = flat_opt.placement.row_range(p)[0]
                local.copy_(grads[step][n][lo : lo + local.shape[0]])
            flat_opt.step()
        one = None
        if rank == 0:  # one process, same gradients
            single = _model()
            single_opt = record.factory(single.parameters(), **config)
            for step in range(STEPS):
                for n, p in single.named_parameters():
                    p.grad = grads[step][n].clone()
                single_opt.step()
            one = {n: p.detach().numpy().copy() for n, p in single.named_parameters()}
        low = any(
            isinstance(v, torch.Tensor) and v.ndim and v.element_size() < 4
            for s in opt.state.values()
            for v in s.values()
        )
        out[(name, ci)] = dict(
            hsdp=hsdp,
            flat=_full(flat),
            one=one,
            local=_local(opt, model),
            groups=groups,
            grad_ok=grad_ok,
            low=low,
        )
    return out


@pytest.fixture(scope="module")
def ranks():
    cases = [c for c in _cases() if skip_reason(_record(c[0])) is None]
    return run_on_ranks(_run, 4, cases, timeout=600)


def _start() -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in _model().named_parameters()}


def _close(got, expected, low, what):
    start = _start()
    for name, value in expected.items():
        tol = TOL
        if low:
            tol = dict(rtol=0, atol=max(1e-6, 2**-7 * float(np.abs(value - start[name]).max())))
        np.testing.assert_allclose(got[name], value, **tol, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-config{c[1]}")
def test_hsdp_equals_one_process_and_fsdp_and_replicas_agree_bitwise(ranks, case):
    reason = skip_reason(_record(case[0]))
    if reason:
        pytest.skip(reason)
    results = [r[case] for r in ranks]
    first = results[0]
    assert all(r["grad_ok"] for r in results), "FSDP2 HSDP gradient is not the 4-rank mean"
    _close(first["hsdp"], first["one"], first["low"], "HSDP 2x2 vs one process")
    _close(first["hsdp"], first["flat"], first["low"], "HSDP 2x2 vs FSDP2 W=4")
    for a, b in ((0, 2), (1, 3)):
        assert results[a]["local"] == results[b]["local"], f"ranks {a} and {b} (replicas) differ"
    for r, result in enumerate(results):
        shard_group = (0, 1) if r < 2 else (2, 3)
        assert result["groups"] <= {shard_group}, (
            f"rank {r}: optimizer.step() ran collectives in groups {result['groups']}, not only "
            f"in its shard group {shard_group}"
        )
        assert result["groups"], f"rank {r}: no collective at all in the shard group"


def _bad_mesh(rank, world, kind):
    """A 2-D mesh given for parameters sharded otherwise: the error each rank raises."""
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415

    from shardflow import DolphinFlow  # noqa: PLC0415

    mesh2d = _mesh(world, True)
    if kind == "flat":  # parameters sharded over all 4 ranks (1-D)
        model = _sharded(_mesh(world, False))
    elif kind == "transposed":  # shards across the other mesh dimension: groups {0,2}, {1,3}
        layout = torch.arange(world).view(2, 2).t()
        model = _sharded(DeviceMesh("cpu", layout, mesh_dim_names=("replicate", "shard")))
    else:  # plain parameters
        model = _model()
    try:
        DolphinFlow(model.parameters(), lr=1e-2, process_group=mesh2d)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("flat", r"1-D mesh .* but process_group is the 2-D mesh .* shard dimension"),
        ("transposed", r"shard dimension holds ranks .* pass the mesh the parameters were sharded"),
        ("plain", r"2-D DeviceMesh .* \(HSDP\) but the parameters are plain tensors"),
    ],
)
def test_a_2d_mesh_that_is_not_the_parameters_is_a_clear_error_on_every_rank(kind, pattern):
    import re  # noqa: PLC0415

    errors = run_on_ranks(_bad_mesh, 4, kind)
    for r, err in enumerate(errors):
        assert err is not None and re.search(pattern, err), f"rank {r}: {err!r}"


# -- replica divergence check -------------------------------------------------------------------


def _perturbed(rank, world, placement):
    """``ReplicaCheck(every=2)``: the check on step 2 passes; one element of one replica's
    '2.weight' is nudged by one ulp and the check on step 4 fires on every rank, naming it.

    HSDP: rank 3 (the replica of rank 1's rows) after step 3: the replicas update their own
    copies, so the difference lives on through step 4. DDP owner plan: rank 1 after step 4 (the
    step's all-gather overwrites every copy from its owner, so a difference made before it
    would be healed or spread alike)."""
    from shardflow import DolphinFlow  # noqa: PLC0415
    from shardflow.distributed.replicas import ReplicaCheck, ReplicaDivergence  # noqa: PLC0415

    if placement == "hsdp":
        model, group, victim, when = _sharded(_mesh(world, True)), _mesh(world, True), 3, 3
    else:
        model, group, victim, when = _model(), dist.group.WORLD, 1, 4
    opt = DolphinFlow(model.named_parameters(), lr=1e-2, ortho_mode="matrix", process_group=group)
    check = ReplicaCheck(opt, every=2)
    fired = []
    for step in range(1, 5):
        opt.zero_grad()
        _loss(model, step, rank, world).backward()
        opt.step()
        if step == when and rank == victim:
            w = dict(model.named_parameters())["2.weight"]
            local = w.to_local() if hasattr(w, "to_local") else w
            with torch.no_grad():
                local.view(-1)[0] = torch.nextafter(local.view(-1)[0], torch.tensor(2.0))
        try:
            check()
        except ReplicaDivergence as exc:
            fired.append((step, str(exc)))
    return fired


@pytest.mark.parametrize("placement", ["hsdp", "ddp"])
def test_replica_check_fires_on_every_rank_when_one_replica_is_perturbed(placement):
    for rank, fired in enumerate(run_on_ranks(_perturbed, 4, placement)):
        assert [step for step, _ in fired] == [4], f"rank {rank}: {fired}"
        assert "parameter '2.weight' differs between the replicas" in fired[0][1], fired[0][1]


# -- checkpoints ------------------------------------------------------------------------------


def _checkpoint_round_trip(rank, world, name, paths):
    """HSDP 2x2: 3 steps, save, 2 more (the uninterrupted run). That checkpoint into 1-D FSDP2 at
    W=4 and into the DDP owner plan, 2 steps each; and FSDP2's own checkpoint back into HSDP."""
    import shardflow.checkpoint as ck  # noqa: PLC0415

    record = _record(name)
    config = record.configs[0]

    def steps(model, opt, start, count):
        for step in range(start + 1, start + count + 1):
            opt.zero_grad()
            _loss(model, step, rank, world).backward()
            opt.step()

    def full(model):
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy()
            for n, p in model.named_parameters()
        }

    mesh2d, mesh1d = _mesh(world, True), _mesh(world, False)
    model = _sharded(mesh2d)
    opt = record.factory(model.parameters(), process_group=mesh2d, **config)
    steps(model, opt, 0, 3)
    ck.save(paths["hsdp"], model=model, optimizer=opt)
    steps(model, opt, 3, 2)
    out = {"uninterrupted": full(model)}
    flat = _sharded(mesh1d)
    flat_opt = record.factory(flat.parameters(), process_group=mesh1d, **config)
    ck.load(paths["hsdp"], model=flat, optimizer=flat_opt)
    ck.save(paths["fsdp"], model=flat, optimizer=flat_opt)
    steps(flat, flat_opt, 3, 2)
    out["hsdp -> fsdp"] = full(flat)
    plain = _model()
    plain_opt = record.factory(plain.parameters(), process_group=dist.group.WORLD, **config)
    ck.load(paths["hsdp"], model=plain, optimizer=plain_opt)
    steps(plain, plain_opt, 3, 2)
    out["hsdp -> ddp"] = full(plain)
    back = _sharded(mesh2d)
    back_opt = record.factory(back.parameters(), process_group=mesh2d, **config)
    ck.load(paths["fsdp"], model=back, optimizer=back_opt)
    steps(back, back_opt, 3, 2)
    out["hsdp -> fsdp -> hsdp"] = full(back)
    return out


@pytest.mark.parametrize("record", all_records(), ids=lambda r: r.name)
def test_hsdp_checkpoints_reshard_to_other_placements_and_back(record, tmp_path):
    """Tolerance: the sharding one above (the placements differ only in the order of sums)."""
    if skip_reason(record):
        pytest.skip(skip_reason(record))
    paths = {k: str(tmp_path / k) for k in ("hsdp", "fsdp")}
    results = run_on_ranks(_checkpoint_round_trip, 4, record.name, paths, timeout=300)[0]
    low = any(dtype.itemsize < 4 for dtype in _state_dtypes(record))
    expected = results.pop("uninterrupted")
    for what, got in results.items():
        _close(got, expected, low, what)


def _state_dtypes(record) -> list[torch.dtype]:
    """The dtypes of the record's state tensors after one step in one process."""
    model = _model()
    opt = record.factory(model.parameters(), **record.configs[0])
    torch.nn.functional.mse_loss(model(_batch(1)[0]), _batch(1)[1]).backward()
    opt.step()
    return [
        v.dtype
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.ndim
    ]
