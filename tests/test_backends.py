"""Every faster backend of every optimizer in the table against its reference backend.

One generic test over ``tests/optim_records``: for each record, each backend it lists
(:class:`optim_table.BackendCheck`), each dtype and each config, two copies of one model take
the same few steps from the same gradients, one on the record's reference backend (the rule as
written, called on each tensor), one on the backend under test
(:func:`shardflow.ops.backend.forced`), and every weight and state tensor is compared within the
record's tolerance. A backend whose rule is changed alone (a sign in a C kernel, a constant in
the compiled path, a foreach op) fails here. Compiled backends (``slow``) run on the record's
first config unless ``SHARDFLOW_TEST_COMPILE=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
from native_fallback import check_off_switch_and_failed_build
from optim_table import BackendCheck, OptimRecord, all_records, skip_reason

from shardflow import DolphinFlow
from shardflow.ops import backend
from shardflow.ops.native import dolphinflow as dolphinflow_native

STEPS = 3


def _cases() -> list:
    out = []
    everything = os.environ.get("SHARDFLOW_TEST_COMPILE") == "1"
    for record in all_records():
        for name, check in record.backends.items():
            configs = record.configs if everything or not check.slow else record.configs[:1]
            for dtype in check.dtypes:
                for k, config in enumerate(configs):
                    dt = str(dtype).removeprefix("torch.")
                    out.append(
                        pytest.param(
                            record, name, check, dtype, config, id=f"{record.name}-{name}-{dt}-{k}"
                        )
                    )
    return out


def _model(dtype: torch.dtype) -> torch.nn.Module:
    """Matrices with rows of 12 and 20 values (⊥Grad per row, a padded tail in the kernels),
    biases (element-wise), a weight without bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 7, bias=False)
    )
    return model.to(dtype)


def _run(record: OptimRecord, config: dict, dtype: torch.dtype, name: str) -> list[torch.Tensor]:
    model = _model(dtype)
    opt = record.factory(model.parameters(), **config)
    gen = torch.Generator().manual_seed(1)
    with backend.forced(name):
        for _ in range(STEPS):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()] + state


@pytest.mark.parametrize("record, name, check, dtype, config", _cases())
def test_backend_equals_the_reference(
    record: OptimRecord, name: str, check: BackendCheck, dtype: torch.dtype, config: dict
):
    reason = skip_reason(record)
    if reason:
        pytest.skip(reason)
    if check.available is not None and not check.available():
        pytest.skip(f"the {name} backend of {record.name} cannot run here")
    got = _run(record, config, dtype, name)
    want = _run(record, config, dtype, record.reference)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        if a.is_floating_point():
            torch.testing.assert_close(
                a,
                b,
                rtol=check.rtol[dtype],
                atol=check.atol[dtype],
                msg=lambda m, k=k: f"tensor {k}: {m}",
            )
        else:
            apart = (a.long() - b.long()).abs().flatten()
            most = int(apart.max()) if apart.numel() else 0
            share = float((apart > 0).double().mean()) if apart.numel() else 0.0
            assert most <= check.code_steps, f"tensor {k}: codes {most} apart"
            assert share <= check.code_fraction, f"tensor {k}: {share:.2%} of codes differ"


def test_every_record_checks_a_backend():
    """The table lists at least DolphinFlow's and DolphinFlow8bit's backends, and every name is
    one :func:`shardflow.ops.backend.choose` knows."""
    listed = {r.name: set(r.backends) for r in all_records() if r.backends}
    assert {"foreach", "native", "compiled"} <= listed["DolphinFlow"]
    assert "native" in listed["DolphinFlow8bit"]
    for names in listed.values():
        assert names <= set(backend.BACKENDS)


def test_forced_backend_must_be_known():
    with (
        pytest.raises(ValueError, match=r"backend='fast' is invalid: choose one of"),
        backend.forced("fast"),
    ):
        pass


def test_the_default_on_the_cpu_is_native_and_compiled_is_chosen_once():
    x = torch.zeros(3)
    ops = backend.choose([x])
    assert (ops.name, ops.foreach, ops.compiled, ops.native) == ("native", True, False, True)
    assert backend.choose([x], compiled=True).name == "compiled"
    assert backend.choose([x], foreach=False, compiled=False).foreach is False
    assert backend.choose([torch.zeros(2, device="meta")]).native is False
    with backend.forced("eager"):
        assert backend.choose([x], compiled=True).name == "eager"
        assert not backend.may_compile(True, [x])
    with pytest.raises(ValueError, match=r"compiled='yes' is invalid"):
        backend.check_compiled("yes")


@pytest.mark.skipif(not dolphinflow_native.available(), reason="no native kernel here")
def test_default_dolphinflow_runs_the_native_kernel(monkeypatch):
    """With default arguments on the CPU every fp32 parameter of the fused route (vector and
    element-wise) takes the native step, its ⊥Grad sums the native row sums."""
    calls = {"step": 0, "row_sums": 0}
    for fn in calls:
        real = getattr(dolphinflow_native, fn)

        def spy(*a, _real=real, _fn=fn, **k):
            calls[_fn] += 1
            return _real(*a, **k)

        monkeypatch.setattr(dolphinflow_native, fn, spy)
    model = _model(torch.float32)
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == {"step": 3, "row_sums": 2}


def test_dolphinflow_native_off_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, tmp_path):
    def step():  # the torch path steps as the kernel would
        model = _model(torch.float32)
        opt = DolphinFlow(model.parameters(), lr=1e-2)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    check_off_switch_and_failed_build(monkeypatch, tmp_path, dolphinflow_native._library, step)
