"""Low-precision weights that train, for every optimizer in the table (tests/optim_table.py).

The setting that defeats round-to-nearest: bf16/fp16 weights near 1 and an lr of 1e-4, so each
step moves a weight by about a tenth of a half-ulp (bf16's half-ulp at 1 is 2⁻⁸ ≈ 3.9e-3, fp16's
2⁻¹¹ ≈ 4.9e-4). 60 steps; the same start and batches in fp32 are the reference ``Δref``.

How the low-precision run's total move ``Δ`` compares (the documented factor): its projection on
the reference, ``k = ⟨Δ, Δref⟩ / ‖Δref‖²``, is within [0.8, 1.25] with ``precision="kahan"`` (the
pair weight + compensation holds ~16 significant bits; measured 0.99-1.01) and with ``"sr"``
(unbiased; its noise of up to half an ulp per element averages out in the projection over ~400
elements; measured 0.93-1.06); at least half as many elements moved as the fp32 move rounded to
the dtype changes. With ``"nearest"`` next to nothing moves (``k < 0.2``; measured 0 but where one
step of WhiteFlow crosses a half-ulp): the failure the precision argument exists for.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_table import all_records, skip_reason

import shardflow
from shardflow.ops import precision as lowp

STEPS, LR = 60, 2e-4
HYPER = {"FactoredProdigy": {"lr": 1.0, "d0": 4e-5, "growth_rate": 1.0}}
"""Per-record overrides of the tiny step (Prodigy's step is ``lr·d``: d held at ``d0``)."""

RECORDS = [r for r in all_records()]


def _hyper(record) -> dict:
    config = dict(record.configs[0])
    config.update({"lr": LR, "gradient_clipping": None})
    config.update(HYPER.get(record.name, {}))
    return config


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(20, 12), (20,), (7, 20)]
    start = [1.0 + 0.05 * torch.rand(s, generator=g) for s in shapes]
    return [torch.nn.Parameter(t.to(torch.bfloat16).to(dtype)) for t in start]  # same values


def _loss(params, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step % 4)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 7, generator=g)
    w1, b1, w2 = (p.float() for p in params)
    return ((x @ w1.T + b1).tanh() @ w2.T / 20 - y).square().mean()


def _move(record, dtype: torch.dtype, precision: str | None) -> torch.Tensor:
    params = _params(dtype)
    start = torch.cat([p.detach().float().flatten() for p in params])
    extra = {} if precision is None else {"precision": precision}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # precision on the fp32 reference: no-op
        opt = record.factory(params, **_hyper(record), **extra)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(params, step).backward()
        opt.step()
    return torch.cat([p.detach().float().flatten() for p in params]) - start


LOW_CASES = [(r, torch.bfloat16) for r in RECORDS] + [
    (r, torch.float16) for r in RECORDS if r.name in ("DolphinFlow", "FactoredAdam")
]
"""bf16 for every optimizer; fp16 (the same code path, another rounding) for two."""


@pytest.mark.parametrize(
    ("record", "dtype"), LOW_CASES, ids=[f"{r.name}-{str(d)[6:]}" for r, d in LOW_CASES]
)
def test_tiny_updates_accumulate_in_low_precision_weights(record, dtype):
    if skip_reason(record):
        pytest.skip(skip_reason(record))
    reference = _move(record, torch.float32, None)
    per_step = float(reference.abs().max()) / STEPS
    assert per_step < 2**-11, "the setting must move weights by less than fp16's half-ulp a step"
    start = torch.cat([p.detach().float().flatten() for p in _params(dtype)])
    reachable = float(((start + reference).to(dtype).float() != start).float().mean())
    assert reachable > 0.5, "the fp32 move, rounded, must change most elements"
    for precision in ("kahan", "sr", None):  # None: the default, Kahan
        delta = _move(record, dtype, precision)
        k = float(delta @ reference / (reference @ reference))
        moved = float((delta != 0).float().mean())
        assert 0.8 <= k <= 1.25, f"{precision}: projection on the fp32 move {k:.3f}"
        assert moved >= 0.5 * reachable, f"{precision}: only {moved:.0%} of the elements moved"
    stuck = _move(record, dtype, "nearest")
    k = float(stuck @ reference / (reference @ reference))
    assert k < 0.2, f"round to nearest should lose nearly every tiny update (k = {k:.3f})"


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_kahan_state_costs_two_bytes_per_bf16_param(record):
    if skip_reason(record):
        pytest.skip(skip_reason(record))
    fp32 = record.factory(_params(torch.float32), **_hyper(record))
    kahan = record.factory(_params(torch.bfloat16), **_hyper(record))
    sr = record.factory(_params(torch.bfloat16), **_hyper(record), precision="sr")
    assert all(
        s["kahan"].dtype == torch.bfloat16 and s["kahan"].shape == p.shape
        for p, s in kahan.state.items()
    )
    assert not any("kahan" in s for s in sr.state.values())
    assert not any("kahan" in s for s in fp32.state.values())
    # state dtypes may follow the weights' (bf16 moments); the compensation adds exactly 2 B/param
    assert kahan.state_bytes_per_param() - sr.state_bytes_per_param() == pytest.approx(2.0)


def test_kahan_state_survives_state_dict_round_trip():
    params = _params(torch.bfloat16)
    opt = shardflow.DolphinFlow(params, lr=LR)
    for step in range(3):
        opt.zero_grad()
        _loss(params, step).backward()
        opt.step()
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = shardflow.DolphinFlow(copies, lr=LR)
    again.load_state_dict(saved)
    for p, q in zip(params, copies):
        assert again.state[q]["kahan"].dtype == torch.bfloat16
        assert torch.equal(again.state[q]["kahan"], opt.state[p]["kahan"])
        assert opt.state[p]["kahan"].abs().sum() > 0  # it holds what rounding lost


def test_store_weight_kahan_keeps_the_residual():
    x = torch.tensor([1.0 + 1e-3, -3.0 - 7e-4, 0.25])
    w, c = torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)
    lowp.store_weight_(w, x.clone(), "kahan", compensation=c)
    assert torch.equal(w, x.to(torch.bfloat16))
    torch.testing.assert_close(lowp.working_copy(w, c), x, rtol=2**-16, atol=0)  # ~16 bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_and_shard_invariant(dtype):
    x = torch.full((1 << 16,), 1.0 + 1e-4) * torch.linspace(1, 1.5, 1 << 16)
    whole = lowp.round_stochastic(x, dtype, seed=7)
    assert float((whole.float() - x).mean().abs()) < 2e-5
    tail = lowp.round_stochastic(x[1000:], dtype, seed=7, offset=1000)
    assert torch.equal(tail, whole[1000:])
    assert not torch.equal(lowp.round_stochastic(x, dtype, seed=8), whole)


def test_bad_precision_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"precision='fp8' is invalid.*kahan"):
        shardflow.DolphinFlow(_params(torch.bfloat16), precision="fp8")


@pytest.mark.parametrize("precision", ["kahan", "sr"])
def test_precision_on_fp32_weights_warns_once(precision):
    with pytest.warns(UserWarning, match=rf"precision='{precision}' has no effect.*fp32") as seen:
        shardflow.WhiteFlow(_params(torch.float32), precision=precision)
    assert len([w for w in seen if "precision" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shardflow.WhiteFlow(_params(torch.bfloat16), precision=precision)  # effective: silent
        shardflow.WhiteFlow(_params(torch.float32))  # not asked: silent


# -- fully decoupled weight decay -------------------------------------------------------------


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_decouple_lr_decays_by_weight_decay_times_lr_over_max_lr(record):
    """With a zero gradient every optimizer's step is the decay alone: ``w·(1 − wd·lr/max_lr)``
    with ``decouple_lr``, ``w·(1 − wd·lr)`` without; halving lr after construction halves it."""
    if skip_reason(record):
        pytest.skip(skip_reason(record))
    for decouple, expected in ((True, 1 - 0.1 * 0.5), (False, 1 - 0.1 * 0.5 * 1e-2)):
        params = _params(torch.float32)
        config = {**_hyper(record), "lr": 1e-2, "weight_decay": 0.1, "decouple_lr": decouple}
        if record.name == "FactoredProdigy":
            config.update(lr=1e-2, d0=1.0)  # Prodigy decays by lr·d
        opt = record.factory(params, **config)
        for group in opt.param_groups:
            group["lr"] *= 0.5  # a scheduler halved it
        start = [p.detach().clone() for p in params]
        for _ in range(2):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        decays = 1 if record.name == "FactoredAdopt" else 2  # ADOPT's first step only sets v
        for p, s in zip(params, start):
            torch.testing.assert_close(p.detach(), s * expected**decays, rtol=1e-6, atol=0)


def test_decouple_lr_needs_a_positive_max_lr():
    with pytest.raises(ValueError, match=r"max_lr=0\.0 is invalid with decouple_lr=True"):
        shardflow.DolphinFlow(_params(torch.float32), lr=0.0, decouple_lr=True)


# -- the compensation buffer under placements and checkpoints ---------------------------------

PLACED = ["DolphinFlow", "FactoredAdam"]
"""Optimizers whose Kahan state goes through a checkpoint at another world size (the buffer is
the base's, the same for all; a dense-state and a factored-state optimizer are checked)."""


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    return model.to(torch.bfloat16)


def _placed(name: str, placement: str, world: int):
    from dist import place  # noqa: PLC0415

    model = _tiny_model()
    group = place(model, placement, world)
    (record,) = [r for r in RECORDS if r.name == name]
    return model, record.factory(model.parameters(), process_group=group, lr=2e-4)


def _train_tiny(model, opt, steps: int, rank: int = 0, world: int = 1) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        out = model(x[rank::world].to(torch.bfloat16)).float()
        torch.nn.functional.mse_loss(out, y[rank::world]).backward()
        opt.step()


def _kahan_pieces(opt) -> list[tuple[int, list]]:
    """Each parameter's compensation rows this rank holds, as ``(first row, values)``."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            c = opt.state[p]["kahan"]
            local = c.to_local() if hasattr(c, "to_local") else c
            first = opt.placement.row_range(p)[0]
            out.append((first, local.float().tolist()))
    return out


def _gather(pieces_per_rank: list[list[tuple[int, list]]]) -> list[torch.Tensor]:
    """Whole compensation buffers from every rank's row pieces (each row held exactly once)."""
    whole = []
    for i in range(len(pieces_per_rank[0])):
        rows = {}
        for pieces in pieces_per_rank:
            first, values = pieces[i]
            for k, row in enumerate(values):
                assert first + k not in rows, "a row held twice"
                rows[first + k] = row
        whole.append(torch.tensor([rows[r] for r in sorted(rows)]))
    return whole


def _save_at_two(rank, world, name, path):
    model, opt = _placed(name, "fsdp", world)
    _train_tiny(model, opt, 4, rank, world)
    import shardflow.checkpoint as ck  # noqa: PLC0415

    ck.save(path, model=model, optimizer=opt)
    return _kahan_pieces(opt)


def _load_at(rank, world, name, path, placement):
    import shardflow.checkpoint as ck  # noqa: PLC0415

    model, opt = _placed(name, placement, world)
    ck.load(path, model=model, optimizer=opt)
    return _kahan_pieces(opt)


@pytest.mark.parametrize("name", PLACED)
def test_kahan_state_reshards_through_a_checkpoint(name, tmp_path):
    """FSDP2 at W=2 saves; the buffer loads bit-exactly at W=4 (FSDP2 rows and the DDP owner
    plan) and in one process."""
    pytest.importorskip("shardflow.distributed.sharded")
    from dist import run_on_ranks  # noqa: PLC0415

    import shardflow.checkpoint as ck  # noqa: PLC0415

    saved = _gather(run_on_ranks(_save_at_two, 2, name, tmp_path / "ck"))
    assert all(c.abs().sum() > 0 for c in saved[:1]), "the buffer should hold rounding residue"
    for placement in ("fsdp", "ddp"):
        loaded = _gather(run_on_ranks(_load_at, 4, name, tmp_path / "ck", placement))
        for a, b in zip(loaded, saved):
            assert torch.equal(a, b), f"W=2 fsdp -> W=4 {placement}"
    model = _tiny_model()
    (record,) = [r for r in RECORDS if r.name == name]
    opt = record.factory(model.parameters(), lr=2e-4)
    ck.load(tmp_path / "ck", model=model, optimizer=opt)
    for a, b in zip(_gather([_kahan_pieces(opt)]), saved):
        assert torch.equal(a, b), "W=2 fsdp -> one process"


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_chunked_working_copies_give_the_same_step(record, monkeypatch):
    """With the working-copy budget below one parameter, each low-precision parameter is updated
    in a chunk of its own: the weights and state equal the one-chunk step's exactly (a per-group
    sum such as Prodigy's accumulates across chunks)."""
    if skip_reason(record):
        pytest.skip(skip_reason(record))

    def run() -> list[torch.Tensor]:
        params = _params(torch.bfloat16)
        opt = record.factory(params, **{**_hyper(record), "lr": 1e-2})
        for step in range(3):
            opt.zero_grad()
            _loss(params, step).backward()
            opt.step()
        state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
        return [p.detach() for p in params] + state

    whole = run()
    calls = []
    monkeypatch.setattr(lowp, "WORKING_COPY_FRACTION", 1e-6)
    cls = type(record.factory([torch.nn.Parameter(torch.zeros(2))]))
    original = cls._update_group

    def counted(self, group, items, ops):
        calls.append(len(items))
        return original(self, group, items, ops)

    monkeypatch.setattr(cls, "_update_group", counted)
    chunked = run()
    assert max(calls) == 1 and len(calls) >= 3, calls
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
