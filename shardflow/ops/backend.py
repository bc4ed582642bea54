"""The backend choice, made once per step in one place: eager, foreach, compiled or native.

An update rule is written once, as plain torch code on one parameter's tensors (DolphinFlow's:
:func:`shardflow.optim.dolphinflow.dolphinflow_rule`). Faster paths run the same rule: the
``foreach`` list ops, the rule itself through ``torch.compile`` (:mod:`.compiling`), or a native
CPU kernel (:mod:`.native`); each is checked against the rule called eagerly
(``tests/test_backends.py``). Which one a step uses is decided here, from the tensors and the
user's ``foreach`` and ``compiled`` arguments, by :func:`choose`, which the optimizers' base calls
once per step (``ShardFlowOptimizer._ops_for``); the result is the step's
:class:`~shardflow.ops.listops.ListOps`, which every rule of the step receives:

- ``compiled``: the user's ``compiled``; ``None`` means: where a tensor is on CUDA;
- ``native``: where every tensor is on the CPU (each kernel still checks that it takes the
  tensors at hand — fp32, contiguous, built here — and ``SHARDFLOW_NATIVE=0`` turns them off);
  a rule prefers ``compiled`` when both are set, except where its compiled form is known to be
  slower than its kernel (DolphinFlow8bit's quantized moments: see its module docstring);
- ``foreach``: the user's ``foreach``; ``None`` means: where all tensors share one device.

**One compile policy.** Every compiled pass is built by :func:`~.compiling.compile_once`, run
under :func:`~.compiling.compile_settings` (entered once per step when :func:`may_compile`), and
cut into calls of :data:`~.compiling.CHUNK` parameters by :func:`~.compiling.each`.

**Forcing a backend** (tests and benchmarks): ``with forced("native"): opt.step()`` makes
:func:`choose` and :func:`may_compile` return that backend whatever the arguments were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

from shardflow.ops.listops import ListOps

BACKENDS = ("eager", "foreach", "compiled", "native")
"""The element-wise backends, by name (:attr:`ListOps.name <shardflow.ops.listops.ListOps.name>`)."""

_FORCED: list[str] = []


def check_compiled(compiled: Any) -> bool | None:
    """``compiled`` as given, or a ``ValueError`` naming it and the fix (the one check)."""
    if compiled is not None and not isinstance(compiled, bool):
        raise ValueError(
            f"compiled={compiled!r} is invalid: pass True, False or None (compile on CUDA only)."
        )
    return compiled


def check_foreach(foreach: Any) -> bool | None:
    """``foreach`` as given, or a ``ValueError`` naming it and the fix."""
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach={foreach!r} is invalid: pass True, False or None (automatic).")
    return foreach


def compiles(compiled: bool | None, tensors: Iterable[Tensor]) -> bool:
    """Whether passes over ``tensors`` go through ``torch.compile``: ``compiled``, or where it
    is None, whether a tensor is on CUDA."""
    if compiled is not None:
        return compiled
    return any(t.device.type == "cuda" for t in tensors)


def choose(
    tensors: list[Tensor], *, foreach: bool | None = None, compiled: bool | None = None
) -> ListOps:
    """The step's backend for ``tensors`` (see the module docstring)."""
    devices = {t.device for t in tensors}
    single = len(devices) <= 1 and not any(d.type == "meta" for d in devices)
    if _FORCED:
        name = _FORCED[-1]
        return ListOps(
            name == "foreach" or (name in ("compiled", "native") and single),
            compiled=name == "compiled",
            native=name == "native",
        )
    return ListOps(
        single if foreach is None else foreach,
        compiled=compiles(compiled, tensors),
        native=all(d.type == "cpu" for d in devices),
    )


def may_compile(compiled: bool | None, tensors: Iterable[Tensor]) -> bool:
    """Whether a step may run compiled passes (then dynamo's settings are entered for it)."""
    if _FORCED:
        return _FORCED[-1] == "compiled"
    return compiles(compiled, tensors)


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Within the block, every step's backend is ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: choose one of {', '.join(BACKENDS)}.")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()
