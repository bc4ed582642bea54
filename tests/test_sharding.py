"""Sharded DolphinFlow equals single-device DolphinFlow: DDP-aware (wrapped and unwrapped) and
FSDP2-aware, on 2 and 4 gloo ranks, in every ``ortho_mode``; collectives per step do not grow with
the model or the accumulation count; state is divided by the world size; bad input fails on every
rank with a clear error.

Tolerances, on the parameters after 20 steps at lr = 1e-2 (weights of order 1, moved ≈ 0.2),
against the single-device run fed the same gradient as the placed run (the gradient it averages
over the ranks, recorded each step: :func:`single_device`). The whole batch's gradient differs
from that average by a few ulps, and the adaptive Newton-Schulz stop (``e ≤ tol``) is a
threshold: a tile whose error lands within those ulps of it runs one iteration more or fewer and
moves by ~lr/2 (0.02 after 20 steps of the block config), so that run is no reference for the
optimizer's placement.

- ``FP32_ATOL = 1e-6`` (element-wise and ⊥Grad modes): the sharded runs differ from one device
  only in the order of floating-point sums (norms and flat ⊥Grad sums summed per shard, then
  over the ranks): a few ulps of a weight of order 1 (ulp = 1.2e-7) over 20 steps.
  Measured: 0 under DDP (wrapped and unwrapped), 2.4e-7 under FSDP2.
- ``NS_ATOL = 20 · lr · a⁵ · 2⁻²⁰ ≈ 9e-5`` (Newton-Schulz modes): the quintic's slope at 0 is
  ``a = 3.4445``, so after 5 iterations a perturbation along a small singular direction of the
  input grows by up to ``a⁵ ≈ 490``; 4×4 tiles often have such directions. Per step the inputs
  differ by a few ulps (2⁻²⁰ relative), so the update by ``lr · a⁵ · 2⁻²⁰``, over 20 steps.
  Measured: 0 (block mode), 6e-8 (matrix mode, FSDP2's per-shard trust-region norms).
- ``BF16_REL = 0.1`` for the bf16 wire (FSDP2's default), relative to the distance travelled:
  ``‖w − w_ref‖ ≤ 0.1 · ‖w_ref − w₀‖`` per parameter against the fp32 single-device run. Each
  matrix is rounded to bf16 (2⁻⁹ relative) on its way to the owner and back, and Newton-Schulz
  amplifies that by up to ``a⁵`` along near-singular directions (4×4 tiles have many), so no
  per-element bound holds; a wire bug (wrong rows, owner or scale) shows as O(1). Measured on 2
  ranks: 0.058 (4×4 blocks), 0.023 (matrix). The fp32-wire runs go through the same code with
  only the cast removed, and are held to ``NS_ATOL``.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank (seconds each)
import torch.distributed as dist
import torch.nn.functional as F
from dist import run_on_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from shardflow import DolphinFlow
from shardflow.distributed.comm import record_collectives
from shardflow.ops.orthogonalize import newton_schulz
from shardflow.optim.routing import param_groups

VOCAB, DIM, SEQ, BATCH, STEPS, LR = 37, 24, 8, 8, 20, 1e-2
FP32_ATOL = 1e-6
NS_ATOL = STEPS * LR * 3.4445**5 * 2**-20
BF16_REL = 0.1

CONFIGS = [
    {"ortho_mode": "vector"},
    {"ortho_mode": "vector", "vector_mode": "flat", "adaptive_lr": False},
    {"ortho_mode": "block", "block_size": 4},
    {"ortho_mode": "matrix", "nesterov": False, "trust_region": 0.05},
    {"ortho_mode": None, "dynamic_momentum": True},
    {"ortho_mode": "block", "block_size": 4, "ns_orthograd": "direction", "vector_mode": "flat"},
]
BF16_CONFIGS = (2, 3)  # the Newton-Schulz modes, run again with the default bf16 wire


class Block(nn.Module):
    """Attention-free mixer: odd row counts (45), a 3-row matrix (an empty shard on 4 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 45)
        self.down = nn.Linear(45, DIM, bias=False)
        self.router = nn.Linear(DIM, 3, bias=False)
        self.mix = nn.Linear(3, DIM)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.gelu(self.up(h))) + self.mix(torch.tanh(self.router(h)))


class TinyLM(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def make_model(layers: int = 2) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(layers)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def groups(model):
    return param_groups(model)


def full_params(model) -> dict[str, np.ndarray]:
    """Whole parameters by name, as numpy arrays (tests/dist.py passes tensors through shared
    memory that vanishes with the rank's process; arrays travel by value)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().numpy().copy()
    return out


def single_device(config: dict, world: int, grads: list | None = None) -> dict[str, np.ndarray]:
    """The run on one device, fed the gradient the ``world`` ranks average, not the whole
    batch's gradient (which differs from it by a few ulps): ``grads`` (one dict by parameter name
    per step, :func:`_averaged_grads` of a placed run), or else the mean of the ranks' batch
    slices' gradients (summed in rank order, then divided, as the unwrapped placement does).

    Why the same gradient: the adaptive Newton-Schulz stop is a threshold (``e ≤ tol``), so a
    tile whose error lands within those ulps of it runs one iteration more or fewer and moves
    by ~lr/2, which no tolerance derived from ulps covers (measured with the whole batch's
    gradient: step 18 of the block config on 2 ranks, 0.02 after 20 steps; DDP's and FSDP2's
    gloo sums over 4 ranks each have their own order). Given the same gradient, the placed
    optimizer does the single-device arithmetic."""
    model = make_model()
    opt = DolphinFlow(groups(model), lr=LR, **config)
    per = BATCH // world
    for step in range(STEPS):
        if grads is not None:
            for name, p in model.named_parameters():
                p.grad = torch.from_numpy(grads[step][name].copy())
        else:
            slices = []
            for rank in range(world):
                opt.zero_grad()
                loss_of(model, batch(step)[rank * per : (rank + 1) * per]).backward()
                slices.append([p.grad.clone() for p in model.parameters()])
            for p, *gs in zip(model.parameters(), *slices):
                p.grad = torch.stack(gs).sum(0).div_(world)
        opt.step()
    return full_params(model)


# -- runs on the ranks ------------------------------------------------------------------------


def build(kind: str, rank: int, world: int, layers: int = 2):
    """The model and the process_group for one placement kind."""
    model = make_model(layers)
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model, mesh
    if kind == "ddp_wrapped":
        return model, DistributedDataParallel(model), dist.group.WORLD
    return model, model, dist.group.WORLD


def _averaged_grads(kind: str, inner, world: int) -> dict[str, np.ndarray]:
    """The whole gradient the placed optimizer steps with, by parameter name: DDP's averaged
    gradient, FSDP2's reduced shards gathered, or (unwrapped) the ranks' gradients averaged as
    the placement does (summed in rank order, divided by the world size)."""
    out = {}
    for name, p in inner.named_parameters():
        g = p.grad
        if kind == "fsdp":
            g = g.full_tensor()
        elif kind == "ddp_unwrapped":
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            g = torch.stack(parts).sum(0).div_(world)
        out[name] = g.detach().numpy().copy()
    return out


def train_sharded(
    kind, config, rank, world, wire=torch.float32, steps=STEPS, micro=1, layers=2, grads=None
):
    """``grads``: a list that receives each step's :func:`_averaged_grads` (read after the step,
    which leaves ``.grad`` as it was, so the collectives log stays the optimizer's own)."""
    inner, model, pg = build(kind, rank, world, layers)
    wrapped = kind == "ddp_wrapped"  # DDP averages the gradients: the optimizer sends none
    opt = DolphinFlow(groups(inner), lr=LR, process_group=pg, grads_reduced=wrapped, **config)
    assert getattr(opt.placement, "grads_reduced", False) == wrapped
    if kind == "fsdp":
        opt.placement.wire_dtype = wire
    per = BATCH // world
    logs = []
    for step in range(steps):
        opt.zero_grad()
        tokens = batch(step)[rank * per : (rank + 1) * per]
        chunks = tokens.chunk(micro)
        with record_collectives() as log:
            for c in chunks:
                (loss_of(model, c) / len(chunks)).backward()
            if kind != "ddp_unwrapped":
                log.clear()  # the wrapper's own gradient traffic is not ours
            opt.step()
        logs.append(log.by_name())
        if grads is not None:
            grads.append(_averaged_grads(kind, inner, world))
    return inner, opt, logs


def _equivalence(rank, world, kinds):
    """Every sharded run's final parameters (rank 0), and this rank's share of the
    single-device references (computed here: the test process itself stays fork-safe)."""
    out, same_grads = {}, {}
    for kind in kinds:
        for ci, config in enumerate(CONFIGS):
            grads: list = []
            model, _, _ = train_sharded(kind, config, rank, world, grads=grads)
            out[(kind, ci)] = full_params(model)
            if rank == 0:  # the single-device run on this run's gradients
                same_grads[(kind, ci)] = single_device(config, world, grads)
        if kind == "fsdp":
            for ci in BF16_CONFIGS:
                model, _, _ = train_sharded(kind, CONFIGS[ci], rank, world, wire=torch.bfloat16)
                out[("fsdp-bf16", ci)] = full_params(model)
    refs = {ci: single_device(c, world) for ci, c in enumerate(CONFIGS) if ci % world == rank}
    return ((out, same_grads) if rank == 0 else None), refs


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _max_relative(a: dict, b: dict, start: dict) -> float:
    """max over parameters of ``‖a − b‖ / ‖b − start‖`` (distance relative to the path)."""
    return max(
        float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k] - start[k]), 1e-12)) for k in a
    )


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_dolphinflow_matches_single_device(world):
    kinds = ("ddp_unwrapped", "ddp_wrapped", "fsdp")
    ranks = run_on_ranks(_equivalence, world, kinds, timeout=240)
    results, same_grads = ranks[0][0]
    references = {ci: ref for _, refs in ranks for ci, ref in refs.items()}
    start = full_params(make_model())
    worst, failed = {}, []
    for (kind, ci), params in results.items():
        ref = references[ci]
        assert _max_diff(ref, start) > 5 * LR, "the reference run must move the weights"
        if kind == "fsdp-bf16":
            worst[(kind, ci)] = rel = _max_relative(params, ref, start)
            if rel > BF16_REL:
                failed.append(f"{kind} {CONFIGS[ci]}: relative distance {rel:.3g} > {BF16_REL}")
            continue
        worst[(kind, ci)] = diff = _max_diff(params, same_grads[(kind, ci)])
        atol = NS_ATOL if CONFIGS[ci]["ortho_mode"] in ("block", "matrix") else FP32_ATOL
        if diff > atol:
            failed.append(f"{kind} {CONFIGS[ci]}: max |Δ| = {diff:.3g} > {atol:.3g}")
    print(f"W={world} max |Δ| per (placement, config):", {k: f"{v:.2g}" for k, v in worst.items()})
    assert not failed, failed


# -- collectives and memory ----------------------------------------------------------------


def _counts(rank, world):
    out = {}
    for kind in ("ddp_unwrapped", "ddp_wrapped", "fsdp"):
        for ci in (0, 1, 2, 3):
            for layers, micro in ((1, 1), (3, 1), (3, 3)):
                _, opt, logs = train_sharded(
                    kind, CONFIGS[ci], rank, world, steps=2, micro=micro, layers=layers
                )
                out[(kind, ci, layers, micro)] = logs[-1]
    state = {}
    for kind in ("ddp_unwrapped", "fsdp"):
        model, opt, _ = train_sharded(kind, CONFIGS[0], rank, world, steps=1)
        plan = opt.placement.plan
        state[kind] = (opt.state_bytes(), opt.param_count(), plan.element_imbalance())
        # row state is a DTensor under FSDP2 (for torch.distributed.checkpoint) and reloads
        exp_avg = [s["exp_avg"] for s in opt.state.values()]
        assert all(isinstance(t, DTensor) == (kind == "fsdp") for t in exp_avg)
        before = [opt.placement.local(t).clone() for t in exp_avg]
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        after = [opt.placement.local(s["exp_avg"]) for s in opt.state.values()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        loss_of(model, batch(0)[rank::world]).backward()
        opt.step()
    keys = [sorted(s.keys()) for s in opt.state.values()]
    return out, state, keys, opt.placement.describe()


def _expected_calls(kind: str, ci: int) -> dict[str, int]:
    """Collectives one step of DolphinFlow makes, from the module docstring of ``sharded``."""
    calls = {"all_reduce": 1}  # the global gradient norm
    if kind.startswith("ddp"):
        calls["all_gather_single"] = 1
        if kind == "ddp_unwrapped":
            calls["all_to_all_single"] = 1
        return calls
    config = CONFIGS[ci]
    if config["ortho_mode"] in ("block", "matrix"):
        calls["all_to_all_single"] = 2
    if config.get("vector_mode") == "flat":
        calls["all_reduce"] += 1  # flattened ⊥Grad
    if config.get("adaptive_lr") is False:
        calls["all_reduce"] += 2  # RMS normalization, one per group (hidden, element-wise)
    if config.get("trust_region"):
        calls["all_reduce"] += 2  # one per group
    return calls


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_per_step_do_not_grow_with_params_or_accumulation_and_state_divides(world):
    results = run_on_ranks(_counts, world, timeout=180)
    for counts, _, keys, plan in results:
        for (kind, ci, layers, micro), calls in counts.items():
            assert calls == _expected_calls(kind, ci), (kind, CONFIGS[ci], layers, micro, calls)
        assert keys == results[0][2], "state keys must be the same on every rank"
        assert "max/mean" in plan and f"{world - 1:>5}" in plan
    single = DolphinFlow(groups(make_model()), lr=LR, **CONFIGS[0])
    total_bytes, total_params = single.state_bytes(), single.param_count()
    for kind in ("ddp_unwrapped", "fsdp"):
        per_rank = [r[1][kind][0] for r in results]
        params = [r[1][kind][1] for r in results]
        assert sum(per_rank) == total_bytes and sum(params) == total_params, kind
        if kind == "ddp_unwrapped":
            limit = results[0][1][kind][2]  # the plan's element imbalance
            assert max(per_rank) / (total_bytes / world) <= limit + 1e-9, (per_rank, limit)
            assert min(per_rank) > 0


# -- bad input ------------------------------------------------------------------------------


def _bad_input(rank, world):
    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)

    mesh2d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    attempt("2d", lambda: DolphinFlow([nn.Parameter(torch.ones(4, 4))], process_group=mesh2d))
    mesh = init_device_mesh("cpu", (world,))
    replicated = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Replicate()]))
    attempt("replicate", lambda: DolphinFlow([replicated], process_group=mesh))
    sharded = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    mixed = [sharded, nn.Parameter(torch.ones(3))] if rank == 1 else [sharded]
    attempt("mixed", lambda: DolphinFlow(mixed, process_group=mesh))
    extra = [nn.Parameter(torch.ones(2, 3))] + ([nn.Parameter(torch.ones(5))] if rank == 1 else [])
    attempt("lists", lambda: DolphinFlow(extra, process_group=dist.group.WORLD))
    shapes = [nn.Parameter(torch.ones(2, 3 + rank))]
    attempt("shapes", lambda: DolphinFlow(shapes, process_group=dist.group.WORLD))
    only0 = dist.new_group([0])
    attempt("member", lambda: DolphinFlow([nn.Parameter(torch.ones(2))], process_group=only0))
    attempt("type", lambda: DolphinFlow([nn.Parameter(torch.ones(2))], process_group="nccl"))
    one = [nn.Parameter(torch.ones(2))]
    attempt("reduced_alone", lambda: DolphinFlow(one, grads_reduced=True))
    attempt("reduced_fsdp", lambda: DolphinFlow([sharded], process_group=mesh, grads_reduced=True))
    world_group = dist.group.WORLD
    attempt("reduced_type", lambda: DolphinFlow(one, process_group=world_group, grads_reduced=1))
    # still usable after the errors: a good construction and one step
    good = [nn.Parameter(torch.ones(3, 2))]
    opt = DolphinFlow(good, process_group=dist.group.WORLD)
    good[0].grad = torch.ones(3, 2)
    opt.step()
    return errors


def test_bad_input_raises_the_same_clear_error_on_every_rank():
    r0, r1 = run_on_ranks(_bad_input, 2, timeout=60)
    expected = {
        "2d": r"2-D DeviceMesh \(2, 1\) \(HSDP\) but the parameters are plain tensors.*process "
        r"group",
        "replicate": r"placements \(Replicate\(\),\): only \(Shard\(0\),\) is supported",
        "mixed": r"rank 1: the parameters mix DTensors .* and plain tensors .*fully_shard",
        "lists": r"different parameter lists \(rank 0 has 1 parameters, rank 1 has 2\).*same order",
        "shapes": r"parameter 0 .* is \(2, 3\) .* on rank 0 and \(2, 4\) .* on rank 1",
        "type": r"process_group='nccl' is invalid: pass a torch.distributed ProcessGroup",
        "reduced_alone": r"grads_reduced=True was given with process_group=None.*leave "
        r"grads_reduced=False",
        "reduced_fsdp": r"grads_reduced=True was given with FSDP2 \(DTensor\) parameters.*"
        r"Leave grads_reduced=False",
        "reduced_type": r"grads_reduced=1 is invalid: pass True .* or False",
    }
    for name, pattern in expected.items():
        for errors in (r0, r1):
            assert errors[name] is not None, f"{name}: no error"
            assert re.search(pattern, errors[name]), (name, errors[name])
        assert r0[name] == r1[name], f"{name}: ranks disagree"
    assert r0["member"] is None  # a group of rank 0 alone is a valid one-rank group
    assert re.search(r"does not contain this rank \(global rank 1\)", r1["member"])


# -- Newton-Schulz does not depend on its batch --------------------------------------------------


def test_newton_schulz_result_does_not_depend_on_the_batch_it_travels_in():
    """The owners batch different matrices than one device does; each must stop on its own."""
    g = torch.Generator().manual_seed(0)
    easy = torch.randn(6, 10, generator=g)
    hard = torch.randn(6, 10, generator=g) @ torch.diag(torch.logspace(0, -3, 10))
    alone = [newton_schulz(m, min_steps=1, max_steps=8) for m in (easy, hard)]
    together = newton_schulz(torch.stack([easy, hard]), min_steps=1, max_steps=8)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone[0], newton_schulz(easy, min_steps=8, max_steps=8), atol=1e-3)
