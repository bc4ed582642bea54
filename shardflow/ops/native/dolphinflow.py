"""A native CPU kernel for DolphinFlow's element-wise step on fp32 moments, and ⊥Grad's row sums.

Why: with default arguments on the CPU (no ``torch.compile``), DolphinFlow's element-wise pass
was ~10 list passes over memory (the foreach ops) and ⊥Grad's sums a few more; one loop per
parameter that reads ``w, g, m, v`` once and writes ``w, m, v`` once does what fused AdamW does
(``python -m bench.step``, bench/results/step-cpu1-2026-12-07.md).

The rule is not written here: ``csrc/dolphinflow_rule.h`` holds DolphinFlow's element-wise rule
in C, the operations of the reference rule
(:func:`shardflow.optim.dolphinflow.dolphinflow_rule`) in its order with one rounding each, and
both this kernel (``csrc/dolphinflow.c``) and the 8-bit fused step (``csrc/quant8.c``) include
it. ``tests/test_backends.py`` runs the kernel against the reference for every record of
``tests/optim_records`` that lists the native backend.

- :func:`step`: ``w ← w·decay − u`` (or ``out ← u``, the direction alone) with the moments
  updated in place, on contiguous fp32 tensors viewed as ``(rows, cols)``; ⊥Grad as per-row
  coefficients ``(a, b)`` (one pair for all rows: flat ⊥Grad), else the clip factor ``c``. Pieces
  of :data:`PIECE` values are shared among torch's OpenMP threads: the result does not depend on
  the thread count (every value's update is its own).
- :func:`row_sums`: ``(⟨g,w⟩, ‖w‖², ‖g‖²)`` per row, summed in fp64, one read of ``g`` and ``w``
  (the clipping-norm pass takes ``‖g‖²`` from them: such gradients are read twice per step).

Used when :func:`available` (x86-64 with AVX2, a C compiler, ``SHARDFLOW_NATIVE`` not ``0``;
built and cached by :mod:`shardflow.ops.native.build`); otherwise the torch path runs (one
warning where the build fails).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, I32, I64, PTR, NativeLibrary, ptr

PIECE = 1 << 14
"""Values per unit of work of one thread (the C file's ``PIECE``)."""

RULE_FIELDS = ("decay", "one_minus_mu", "mu", "beta2", "one_minus_beta2", "scale", "eps", "c")
"""The rule's scalars, in the order of the reference's ``s`` and of ``DFRule`` in
``csrc/dolphinflow_rule.h``."""


class Rule(ctypes.Structure):
    """``DFRule`` of ``csrc/dolphinflow_rule.h``: the scalars (fp32) and two flags."""

    _fields_ = [
        *((name, ctypes.c_float) for name in RULE_FIELDS),
        ("nesterov", ctypes.c_int32),
        ("adaptive", ctypes.c_int32),
    ]


def rule(scalars: tuple[float, ...], *, nesterov: bool, adaptive: bool = True) -> Rule:
    """The ``DFRule`` of one parameter's step from the reference's scalars (:data:`RULE_FIELDS`)."""
    return Rule(*map(float, scalars), int(nesterov), int(adaptive))


_library = NativeLibrary(
    "dolphinflow",
    "dolphinflow.c",
    {
        # n, cols, w, wc, w_bytes, g, g_bytes, m, v, fa, fb, fold_stride, out, rule
        "sfd_step": [I64, I64, PTR, PTR, I32, PTR, I32, PTR, PTR, PTR, PTR, I64, PTR, PTR],
        # rows, cols, g, g_bytes, w, wc, w_bytes, out
        "sfd_row_sums": [I64, I64, PTR, I32, PTR, PTR, I32, PTR],
    },
    fallback="DolphinFlow uses the torch path (slower, the same rule)",
    flags=FLAGS,
    defines={"PIECE": PIECE},
)
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


def usable(*tensors: Tensor | None) -> bool:
    """Whether the kernel takes these tensors (None: absent): CPU, contiguous, fp32."""
    return available() and all(t is None or _plain(t, torch.float32) for t in tensors)


def takes_bf16(w: Tensor, g: Tensor, compensation: Tensor | None) -> bool:
    """Whether the kernel reads and writes the weight ``w`` itself: ``w`` and ``g`` CPU,
    contiguous, fp32 or bf16 (one of them bf16), ``compensation`` None or bf16 of ``w``'s shape
    (the moments and fold are checked by :func:`usable`)."""
    return (
        available()
        and any(t.dtype == torch.bfloat16 for t in (w, g))
        and all(_plain(t, torch.float32) or _plain(t, torch.bfloat16) for t in (w, g))
        and (
            compensation is None
            or (_plain(compensation, torch.bfloat16) and compensation.shape == w.shape)
        )
    )


def _plain(t: Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype


def _bytes(t: Tensor) -> int:
    return t.element_size()


def step(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor | None,
    scalars: tuple[float, ...],
    fold: tuple[Tensor, Tensor] | None = None,
    *,
    nesterov: bool,
    adaptive: bool = True,
    out: Tensor | None = None,
    compensation: Tensor | None = None,
) -> None:
    """DolphinFlow's element-wise step (the reference rule) on one parameter, in place.

    ``m, v`` (``v`` None without ``adaptive``), the fold and ``out`` are :func:`usable`; ``w``
    and ``g`` fp32 or bf16 (:func:`takes_bf16`), all of one shape, whose first dimension is the
    rows of ``fold``'s coefficients ``(a, b)`` (one value per row, or one for all); ``scalars``
    as :data:`RULE_FIELDS`. ``out`` given: the direction is written there and ``w`` only read.
    A bf16 ``w`` is read as ``w + compensation`` and written back as
    :func:`shardflow.ops.precision.store_weight_` does — Kahan with a ``compensation``, round to
    nearest without — in the same pass: no fp32 working copy.
    """
    n = w.numel()
    if not n:
        return
    cols = n // w.shape[0] if w.ndim and fold is not None and fold[0].numel() > 1 else n
    fa, fb = (None, None) if fold is None else fold
    stride = 0 if fold is None or fold[0].numel() == 1 else 1
    r = rule(scalars, nesterov=nesterov, adaptive=adaptive)
    wc = compensation if w.dtype == torch.bfloat16 else None
    _library().sfd_step(
        n, cols, ptr(w), ptr(wc), _bytes(w), ptr(g), _bytes(g), ptr(m), ptr(v), ptr(fa),
        ptr(fb), stride, ptr(out), ctypes.byref(r),
    )  # fmt: skip


def row_sums(g: Tensor, w: Tensor, compensation: Tensor | None = None) -> Tensor:
    """``(⟨g,w⟩, ‖w‖², ‖g‖²)`` of each row of ``g`` and ``w`` (:func:`usable`, or fp32/bf16 as
    :func:`takes_bf16` says; a bf16 ``w`` counts as ``w + compensation``), of one shape, rows
    along dim 0 (a 1-D tensor is one row): a ``(rows, 3)`` fp32 tensor, summed in fp64."""
    rows = g.shape[0] if g.ndim >= 2 else 1
    out = torch.empty(rows, 3, dtype=torch.float32)
    wc = compensation if w.dtype == torch.bfloat16 else None
    if g.numel():
        _library().sfd_row_sums(
            rows, g.numel() // rows, ptr(g), _bytes(g), ptr(w), ptr(wc), _bytes(w), ptr(out)
        )
    elif rows:
        out.zero_()
    return out
