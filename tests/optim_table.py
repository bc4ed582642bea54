"""The table of optimizers that the generic tests run over.

Each optimizer joins by adding a module ``tests/optim_records/<name>.py`` that defines
``RECORDS: list[OptimRecord]``; nothing else needs to change. Skip rules live in one place:
:func:`skip_reason`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True)
class BackendCheck:
    """One faster backend of an optimizer, checked against its reference backend
    (``tests/test_backends.py``): a few steps from the same state and gradients, compared."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    """Parameter dtypes to run it on (each with its own tolerance below)."""
    rtol: dict[torch.dtype, float] = field(
        default_factory=lambda: {torch.float32: 1e-5, torch.float64: 1e-12}
    )
    atol: dict[torch.dtype, float] = field(
        default_factory=lambda: {torch.float32: 1e-6, torch.float64: 1e-13}
    )
    code_steps: int = 0
    """Integer state (8-bit codes): how far apart two codes may be ..."""
    code_fraction: float = 0.0
    """... at what fraction of positions at most."""
    slow: bool = False
    """Only the record's first config runs, unless ``SHARDFLOW_TEST_COMPILE=1`` (compilation
    takes 10-60 s per variant on a 2-core CPU)."""
    available: Callable[[], bool] | None = None
    """Whether the backend can run here (None: always); it is skipped with a reason otherwise."""


@dataclass(kw_only=True)
class OptimRecord:
    """One optimizer as the generic tests see it."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    """``factory(params, **config)`` builds the optimizer."""
    configs: list[dict[str, Any]]
    """Valid configurations; every generic test runs on each."""
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """``(config, regex)``: building with ``config`` raises ``ValueError`` matching ``regex``."""
    foreach: bool = True
    """Whether the optimizer takes ``foreach=`` (True/False paths compared in float64)."""
    needs: tuple[str, ...] = ()
    """Importable modules the optimizer needs (e.g. ``"bitsandbytes"``)."""
    float64: bool = True
    """Whether the optimizer accepts float64 parameters."""
    reference: str = "eager"
    """The backend the others are checked against (:data:`shardflow.ops.backend.BACKENDS`):
    the rule as written, called on each tensor."""
    backends: dict[str, BackendCheck] = field(default_factory=dict)
    """The faster backends (by name) and their tolerances against ``reference``."""


def all_records() -> list[OptimRecord]:
    """Every record from ``tests/optim_records``, in module-name order."""
    import optim_records  # noqa: PLC0415

    records: list[OptimRecord] = []
    for info in sorted(pkgutil.iter_modules(optim_records.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"optim_records.{info.name}")
        records.extend(module.RECORDS)
    return records


def cases() -> list[tuple[OptimRecord, dict[str, Any]]]:
    """``(record, config)`` pairs for parametrized tests."""
    return [(r, c) for r in all_records() for c in r.configs]


def case_id(case: tuple[OptimRecord, dict[str, Any]]) -> str:
    record, config = case
    return record.name + "-" + "-".join(f"{k}={v}" for k, v in config.items())


def skip_reason(record: OptimRecord) -> str | None:
    """Why a record cannot run here, or None. The only place tests decide to skip."""
    for module in record.needs:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{record.name} needs {module}, which is not installed"
    return None
