"""Native CPU kernels for WhiteFlow's step: the element-wise fallback in one pass, and the row
passes of a channel-scaled hidden matrix around its projection product.

Why: WhiteFlow's torch path makes dozens of tensor ops per parameter (its stochastic rounding
alone ~15 int ops per state), with a full-size temporary each: with default arguments on one CPU thread,
42.5 M parameters of SmolLM2 shapes, its step took 158× fused AdamW's and its first step grew
the process by ~24 B per parameter (bench/results/whiteflow-step-cpu2-2026-12-07.md). Here:

- **element-wise** (embeddings, norms, ``ortho_mode=None``): one pass per element, every
  parameter of a group in one call (:func:`elementwise_many`), cut into blocks of :data:`BLOCK`
  elements shared among torch's OpenMP threads; reads w, g, m, v and writes them back (22 B per
  element for fp32 weights and bf16 states), no temporary;
- **projected** hidden matrices (:func:`rows_projected`): per chunk of at most :data:`CHUNK`
  elements of rows, pass 1 (C) computes each row's ⊥Grad sums, ``g⊥`` and the fp32 momentum into
  a scratch ``x`` (``2·rows × n``), ``torch.mm`` forms ``x @ P`` (one product for both), pass 2
  (C) updates ``V_R``, computes the channel scale and — unless the norm-growth limiter must see
  every parameter's norm first — stores the momentum and moves the weights from the scratch while
  the chunk is in cache. The scratch (``x`` and ``x @ P``, each at most ``2·max(CHUNK, n)``
  floats: ≤ 1 MiB in all for ``n ≤ CHUNK``) and the coefficients (16 B per row) are the step's
  only temporaries;
- **dense** hidden matrices (:func:`rows_dense`): one C call, each row in one sweep (sums, then
  ``g⊥``, momentum, second moment and the norms, then the store), a row buffer per thread;
- after the limiter (:func:`rows_apply`): the weights and momentum from the scales, with
  ``g⊥`` and the momentum recomputed from the raw gradient, as the torch path does.

**Arithmetic.** The torch path's operations (:func:`~shardflow.optim.whiteflow.
whiteflow_elementwise_`, ``whiteflow_scales_``, ``whiteflow_apply_``) in its order, in fp32, with
a fused multiply-add exactly where torch's vectorized ``lerp`` uses one, and its stochastic
rounding bit for bit (:func:`~shardflow.ops.precision.bf16_stochastic`: element ``i`` of a state
adds the low 16 bits of ``lowbias32((offset + i) ^ key)``). The element-wise step's momentum and
second moment are bit-identical to the torch path's; its weights agree to one fp32 ulp, because
torch's CPU ``sqrt`` is not correctly rounded (one ulp off on ~15 % of elements on the AMD EPYC
machine) and ``vsqrtps`` is. For hidden matrices the row sums (``⟨g,w⟩, ‖w‖², ‖g‖²`` and the
norms of the channel scale) are summed in fp64 in another order than torch's reductions, the
momentum is projected before the bias correction multiplies it (``corr₁·(m·P)`` for
``(corr₁·m)·P``) and the product is summed in MKL's order for the chunk: fp32 differences that
flip a stochastic rounding of a state element (one bf16 ulp) with probability ≈ ulps/2¹⁶ — the
tolerance of the compiled path (tests/test_whiteflow_native.py gives the bounds). Row results
never depend on the thread count; the element-wise norms (limiter only) are summed per block in
block order.

**Where the time goes** (default arguments, 42.5 M parameters of SmolLM2 shapes, one thread;
bench/results/whiteflow-step-cpu2-2026-12-07.md): the two products ``g⊥·P`` and ``M·P``
(4·r = 1024 FLOP per hidden-matrix parameter at r = 256) are most of the step; the passes here
are memory-bound (an fp32 instead of fp64 row sum changed nothing measurable).

fp32 weights (bf16 weights reach a rule as an fp32 working copy), fp32 or bf16 gradients (read
exactly as fp32, as the torch path's ``g.to(float32)``), bf16 states, contiguous, on the CPU
(:func:`usable`); everything else takes the torch path. The kernels are the C file ``csrc/whiteflow.c``, built by
:mod:`shardflow.ops.native.build` (AVX2 + FMA; ``SHARDFLOW_NATIVE=0`` switches them off).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from shardflow.ops.native.build import FLAGS, I64, PTR, NativeLibrary

BLOCK = 1 << 16
"""Elements per task of the element-wise pass (the C file's ``BLOCK``): the unit of work of one
thread, and of the fixed order in which the limiter's norms are summed."""

CHUNK = 1 << 16
"""Elements of rows (``rows × n``) per chunk of the projected pass: its scratch (``g⊥`` and the
momentum, fp32, ~512 KiB) stays in the L2 cache between the product and the store, and
bounds the step's temporaries whatever the matrix's size."""

_HYPER = ("c", "omb1", "corr1", "b2", "omb2", "inv_weight", "eps", "decay", "eta")


class _Hyper(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in _HYPER]


class _Job(ctypes.Structure):
    _fields_ = [
        ("h", _Hyper),
        *((name, ctypes.c_void_p) for name in ("w", "g", "m", "v")),
        *((name, ctypes.c_int64) for name in ("rows", "n", "r", "offset_m", "offset_v")),
        ("key_m", ctypes.c_uint32),
        ("key_v", ctypes.c_uint32),
        ("sr", ctypes.c_int32),
        ("g_bf16", ctypes.c_int32),
    ]


_F32 = ctypes.c_float
_library = NativeLibrary(
    "whiteflow",
    "whiteflow.c",
    {
        "swf_elementwise": [I64, PTR, ctypes.c_int32, PTR],
        "swf_rows_prepare": [PTR, I64, I64, PTR, PTR],
        "swf_rows_finish": [PTR, I64, I64, PTR, PTR, PTR, _F32, ctypes.c_int32],
        "swf_rows_dense": [PTR, I64, I64, PTR, ctypes.c_int32],
        "swf_rows_apply": [PTR, I64, I64, PTR],
    },
    fallback="WhiteFlow uses its torch path (slower, the same rule to fp32 rounding)",
    flags=[*FLAGS, "-mfma"],
    defines={"BLOCK": BLOCK},
)
"""The compiled kernels (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def available() -> bool:
    """Whether the native kernels can run here (built on first call)."""
    return _library() is not None


class Job(NamedTuple):
    """One parameter for the kernels.

    ``w`` (fp32 weights, updated in place) and ``g`` (its raw gradient, fp32 or bf16, read
    only) as
    ``(rows, n)`` for a hidden matrix or flat for the element-wise step; ``m`` (bf16, the
    shape of ``w``) and ``v`` (bf16: ``(rows, r)`` projected, else the shape of ``w``);
    ``hyper``: :meth:`~shardflow.optim.whiteflow.WhiteFlow._hyper`'s nine scalars ``[c, 1−β₁,
    1/(1−β₁ᵗ), β₂ₜ, 1−β₂ₜ, 1/cₜ, eps, 1−η·λ, η]``; ``keys``: ``(key_m, offset_m, key_v,
    offset_v)`` of the stochastic rounding, or None to round to nearest."""

    w: Tensor
    g: Tensor
    m: Tensor
    v: Tensor
    hyper: Sequence[float]
    keys: tuple[int, int, int, int] | None


def usable(w: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    """Whether the kernels take this parameter: fp32 weights (a bf16 weight's fp32 working copy
    included), an fp32 or bf16 gradient of the same size, bf16 states, all contiguous on the
    CPU, where the kernels are available."""
    return (
        w.dtype == torch.float32
        and g.dtype in (torch.float32, torch.bfloat16)
        and m.dtype == torch.bfloat16
        and v.dtype == torch.bfloat16
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (w, g, m, v))
        and g.numel() == w.numel() == m.numel()
        and available()
    )


def _job(job: Job, rows: int, n: int, r: int) -> _Job:
    keys = job.keys or (0, 0, 0, 0)
    return _Job(
        _Hyper(*job.hyper),
        job.w.data_ptr(),
        job.g.data_ptr(),
        job.m.data_ptr(),
        job.v.data_ptr(),
        rows,
        n,
        r,
        keys[1],
        keys[3],
        keys[0] & 0xFFFFFFFF,
        keys[2] & 0xFFFFFFFF,
        job.keys is not None,
        job.g.dtype == torch.bfloat16,
    )


def elementwise_many(jobs: list[Job], *, norm_only: bool = False) -> Tensor | None:
    """The element-wise step (:func:`~shardflow.optim.whiteflow.whiteflow_elementwise_`) of
    every job in one call, in place on ``w``, ``m`` and ``v``. With ``norm_only`` nothing is
    written and the result is ``‖u‖²`` of each job (float64, for the norm-growth limiter; the
    caller then calls again with ``η`` times the limiter's factor)."""
    table = (_Job * len(jobs))(*(_job(j, 1, j.w.numel(), j.w.numel()) for j in jobs))
    usq = torch.zeros(len(jobs), dtype=torch.float64) if norm_only else None
    if jobs:
        _library().swf_elementwise(
            len(jobs),
            ctypes.addressof(table),
            int(norm_only),
            None if usq is None else usq.data_ptr(),
        )
    return usq


class Scratch:
    """The projected pass's buffers, grown on demand and reused for every matrix of a step."""

    def __init__(self) -> None:
        self.x = torch.empty(0, dtype=torch.float32)
        self.z = torch.empty(0, dtype=torch.float32)

    def get(self, x_numel: int, z_numel: int) -> tuple[Tensor, Tensor]:
        if self.x.numel() < x_numel:
            self.x = torch.empty(x_numel, dtype=torch.float32)
        if self.z.numel() < z_numel:
            self.z = torch.empty(z_numel, dtype=torch.float32)
        return self.x, self.z

    def bytes(self) -> int:
        return 4 * (self.x.numel() + self.z.numel())


def chunk_rows(n: int) -> int:
    """Rows per chunk of the projected pass for a matrix of ``n`` columns."""
    return max(1, CHUNK // max(n, 1))


def rows_projected(job: Job, proj: Tensor, scratch: Scratch, *, apply: bool) -> Tensor:
    """The projected route's step for one matrix (``w`` ``(rows, n)``, ``v`` ``(rows, r)``,
    ``proj`` ``(n, r)`` fp32): updates ``v`` and, with ``apply``, ``m`` and ``w``. Returns
    ``coef`` ``(rows, 4)``: ``[a·c, b, s, ‖uᵢ‖²]`` as :func:`~shardflow.optim.whiteflow.
    whiteflow_scales_` (what :func:`rows_apply` needs after the limiter)."""
    rows, n = job.w.shape
    r = proj.shape[1]
    coef = torch.empty(rows, 4, dtype=torch.float32)
    table = _job(job, rows, n, r)
    lib = _library()
    per = chunk_rows(n)
    k_max = min(per, rows)
    x_all, z_all = scratch.get(2 * k_max * n, 2 * k_max * r)
    root = math.sqrt(n / r)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        k = r1 - r0
        x = x_all[: 2 * k * n].view(2 * k, n)
        z = z_all[: 2 * k * r].view(2 * k, r)
        lib.swf_rows_prepare(ctypes.addressof(table), r0, r1, x.data_ptr(), coef.data_ptr())
        torch.mm(x, proj, out=z)
        lib.swf_rows_finish(
            ctypes.addressof(table),
            r0,
            r1,
            x.data_ptr(),
            z.data_ptr(),
            coef.data_ptr(),
            root,
            int(apply),
        )
    return coef


def rows_dense(job: Job, *, apply: bool) -> Tensor:
    """The dense route's step for one matrix (``w``, ``m``, ``v`` ``(rows, n)``): updates ``v``
    and, with ``apply``, ``m`` and ``w``; returns ``coef`` as :func:`rows_projected`."""
    rows, n = job.w.shape
    coef = torch.empty(rows, 4, dtype=torch.float32)
    table = _job(job, rows, n, n)
    _library().swf_rows_dense(ctypes.addressof(table), 0, rows, coef.data_ptr(), int(apply))
    return coef


def rows_apply(job: Job, coef: Tensor) -> None:
    """Momentum and weights of one matrix from ``coef`` (after the limiter scaled ``s``), as
    :func:`~shardflow.optim.whiteflow.whiteflow_apply_`."""
    rows, n = job.w.shape
    table = _job(job, rows, n, n)
    coef = coef.contiguous()
    _library().swf_rows_apply(ctypes.addressof(table), 0, rows, coef.data_ptr())
