"""A native CPU kernel for the 8-bit state: quantize, dequantize, and DolphinFlow's fused step.

Why: in torch ops, requantizing a moment costs ~10 passes over memory and two table look-ups
per value (``index_select`` over a 65536-entry fp16-bits table, on one thread), and
``torch.compile`` does not help (inductor's CPU code loads uint8 and gathers table entries one
lane at a time: 3-15 ns per value, slower than eager; bench/results/dolphinflow8bit-cpu2-2026-11-23.md).
The kernel is the C file ``csrc/quant8.c`` (AVX2 or AVX-512 intrinsics), compiled with the system
C compiler on first use by :mod:`shardflow.ops.native.build`; this module holds its ctypes
structures and signatures and calls it through :mod:`ctypes`; rows are split over torch's OpenMP
threads.

**Nearest code without a search.** bitsandbytes' dynamic map (``create_dynamic_map``) is, per
exponent band ``i = 0..6`` (magnitudes ``[10^(i−7), 10^(i−6)]``), ``q = 2^i`` codes (signed
map; ``2^(i+1)`` unsigned) at the centres of ``q`` equal cells, mirrored for negative values
(signed), plus 0 and 1. For a normed value ``x`` the kernel finds the band (six comparisons;
the AVX-512 builds: from the exponent bits) and the position ``p = (|x|·10^(6−i) − 0.1)·q/0.9 −
½ + base_i`` (code ``base_i + k`` of the band at ``p = base_i + k``, so the midpoints inside the
band at ``+ ½``); the code at or below ``|x|`` is ``p`` truncated (``p > 0``; ``253 −`` it for
``x < 0``). Whether to go one code up is decided on ``p`` against the midpoint's position
(the code ``+ ½``), or at the band's edges the positions (per band, from the exact fp32
midpoints, :func:`band_constants`) of the midpoints to the previous band's last code (or 0)
and to the next band's first code (or 1). The arithmetic and the midpoints' own roundings are
off by < 7·10⁻⁵ of a cell (midpoints' positions: ≤ 1.5·10⁻⁵, one fp32 ulp at 255; ``p``:
≤ 2.4·10⁻⁵; the AVX-512 builds' ``x·(1/s)``: ≤ 2.6·10⁻⁵; measured 2–5·10⁻⁵: a window narrower
than 5·10⁻⁵ starts to miss); where ``p`` lies within ``NEAR`` = 2·10⁻⁴ of a cell of the
midpoint (~0.04% of values) the kernel compares ``x`` itself with the exact fp32 midpoint
``T[c]`` between the candidate ``c`` and the next code (a 256-entry gather), as the table
quantizer does. So the codes are bitwise those of :func:`shardflow.ops.quant8._fp16_table`'s (checked
on every fp32 value in [−1, 1] by ``bench/quant8_native_exhaustive.py``, which also checks
quotients within ±300 ulps of every midpoint and code for 64 random block scales; in the tests
on every value within ±300 ulps of every midpoint and code, times four scales, and on random
values over nine decades). Values are divided by the block's absmax (IEEE division, as the
torch path; the AVX-512 builds multiply by its reciprocal and divide where near); NaN gives the
code of 0 and a NaN absmax, as there (a NaN absmax divides by 1, as there).

**The fused step** (:func:`step_rows`): per block of 256 (or 64) values of a row, dequantize
both moments (a gather from the 256-entry map times the block's scale), apply DolphinFlow's
element-wise rule (``csrc/dolphinflow_rule.h``, shared with the fp32 kernel
:mod:`~shardflow.ops.native.dolphinflow`: the reference rule's operations in its order, one
rounding each, no fused multiply-add), keep the new moments in a 1 KiB buffer and their absmax
in registers, requantize: every value is read and written once, with no fp32 copy of a moment
in memory.

**Three builds** of the one source (:data:`ISA_FLAGS`, :func:`host_isas`; the loops are written
once over a vector type of ``W`` lanes):

- ``avx2`` (8 lanes): the band by six comparisons, the map and the rare midpoints by gathers.
- ``avx512`` (16 lanes; where torch itself dispatches to AVX-512): no gathers but near a
  midpoint — on the Ice Lake Xeon measured, the AVX2 build's two decode gathers take ≈1.9 of
  its ≈4.2 ns per parameter (``python -m bench.kernels``; Intel's 2023 GDS microcode is known to slow gathers on such
  cores; this VM's kernel reports "Not affected", so the cause is not confirmed). The band comes from the
  exponent bits of ``|x|`` (a 32-entry table of the band at the bottom of each binade 2⁻³¹..2⁰
  and the one band edge inside it, :func:`binade_band`: two register permutes and a compare);
  the band constants by register permutes; the map's 256 values by eight 32-entry permutes.
  Values are normed by ``x·(1/s)``, within 2 ulps of ``x/s`` (≤ 2.6·10⁻⁵ of a cell): only
  where that is too close to call (``NEAR``) the quotient ``x/s`` itself is compared with the
  midpoint, so the codes stay bitwise the torch path's (checked on quotients within ±300 ulps
  of every midpoint and code).
- ``avx512vbmi`` (the same, on CPUs with AVX-512 VBMI): 64 values decoded at once, each byte of
  their fp32 values by two 128-entry byte permutes (``vpermt2b``) from byte planes of the map.

Measured, one thread: on a 2-core AMD EPYC (Zen3, AVX2; 1536×576) quantize ≈1.2 ns per value
(torch path: 4.5–12), dequantize ≈0.6 (1.4–1.7), the fused step ≈3.6 ns per parameter
(DolphinFlow's compiled element-wise pass: ≈1.0; bench/results/dolphinflow8bit-cpu2-2026-11-23.md,
run 7); on a 2-core Ice Lake Xeon (49152×576, ``python -m bench.kernels``) the fused step takes
4.3 (avx2), 1.76 (avx512) and 1.48 (avx512vbmi) ns per parameter against 1.13 for DolphinFlow's
compiled pass (bench/results/dolphinflow8bit-icelake2-2026-12-06.md).

Used when :func:`available`: an x86-64 CPU with AVX2 (``torch.backends.cpu``), a C compiler
(``$CC``, else ``cc``), and ``SHARDFLOW_NATIVE`` not set to ``0``. Each build (with ``-DHEAD``,
``-DTAIL`` from :data:`HEAD_BLOCK`, :data:`TAIL_BLOCK`) is compiled once per source, defines and
flags into the private cache directory (``$SHARDFLOW_CACHE_DIR``, default
``~/.cache/shardflow``) and checked against its recorded sha256 before it is loaded. Where the
compiler cannot build the host's best build, the next one that builds is used
(:func:`host_library`, :func:`active_isa` tells which). Otherwise (or if no build succeeds: one
warning) the torch path runs, with the same codes. The building, the cache and its safety
rules, loading and the link to torch's OpenMP runtime are :mod:`shardflow.ops.native.build`'s
(shared with the other kernels).
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

import torch
from torch import Tensor

from shardflow.ops.native import dolphinflow as dolphinflow_native
from shardflow.ops.native.build import FLAGS, NativeLibrary
from shardflow.ops.native.build import I64 as _I64
from shardflow.ops.native.build import PTR as _PTR
from shardflow.ops.native.build import ptr as _ptr

HEAD_BLOCK, TAIL_BLOCK = 256, 64
"""Values per head block and per tail block of a row, as :mod:`shardflow.ops.quant8`'s (not
imported: it imports this module); the C file gets them as ``HEAD`` and ``TAIL``."""


class _Map(ctypes.Structure):
    _fields_ = [
        ("mult", ctypes.c_float * 8),
        ("off", ctypes.c_float * 8),
        ("lo", ctypes.c_float * 8),
        ("hi", ctypes.c_float * 8),
        ("edge", ctypes.c_float * 32),
        ("band_of", ctypes.c_int32 * 32),
        ("planes", ctypes.c_uint8 * 1024),
        ("sgn", ctypes.c_int32),
        ("T", ctypes.c_void_p),
        ("map", ctypes.c_void_p),
    ]


_SIGNATURES: dict[str, list[type]] = {
    # r0, r1, w, g, cols, code_cols, head_blocks, blocks, mc, ms, vc, vs, fa, fb, fold_stride,
    # rule, m map, v map
    "sf8_step_rows": [_I64, _I64, _PTR, _PTR, *[_I64] * 4, *[_PTR] * 6, _I64, *[_PTR] * 3],
    # r0, r1, x, code_cols, head_blocks, blocks, codes, absmax, map
    "sf8_quantize_rows": [_I64, _I64, _PTR, *[_I64] * 3, *[_PTR] * 3],
    # r0, r1, codes, absmax, code_cols, head_blocks, blocks, out, map
    "sf8_dequantize_rows": [_I64, _I64, _PTR, _PTR, *[_I64] * 3, _PTR, _PTR],
}


ISA_FLAGS: dict[str, list[str]] = {
    "avx2": [],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
    "avx512vbmi": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx512vbmi"],
}
"""The builds of the source, by instruction set, added to :data:`~shardflow.ops.native.build.FLAGS`:
AVX2 (8 lanes, the map through gathers), AVX-512 (16 lanes, every look-up a register permute),
AVX-512 VBMI (the same, values decoded by byte permutes)."""


def _kernel(isas: list[str]) -> NativeLibrary:
    """The kernel built for ``isas[0]``, else for the first of the others that builds."""
    return NativeLibrary(
        "quant8",
        "quant8.c",
        _SIGNATURES,
        fallback="DolphinFlow8bit uses the torch path (slower, same codes)",
        flags=[*FLAGS, *ISA_FLAGS[isas[0]]],
        alternatives=[[*FLAGS, *ISA_FLAGS[isa]] for isa in isas[1:]],
        defines={"HEAD": HEAD_BLOCK, "TAIL": TAIL_BLOCK},
    )


@functools.cache
def library(isa: str) -> NativeLibrary:
    """The kernel built for ``isa`` (a key of :data:`ISA_FLAGS`)."""
    return _kernel([isa])


def host_isas() -> list[str]:
    """The builds this CPU runs, best last: AVX-512 where torch dispatches its own CPU kernels
    to it (``torch.backends.cpu``; ``ATEN_CPU_CAPABILITY=avx2`` turns both down), with VBMI
    where the CPU has it (``/proc/cpuinfo``)."""
    isas = ["avx2"]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        isas.append("avx512")
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if re.search(r"^flags\s*:.*\bavx512vbmi\b", flags, re.MULTILINE):
            isas.append("avx512vbmi")
    return isas


def host_library() -> NativeLibrary:
    """The kernel in the best build this CPU runs; where the compiler cannot build it (one too
    old for an instruction set), the next best that builds."""
    return _kernel(host_isas()[::-1])


_library = host_library()
"""The compiled kernel (``_library()``: the ``ctypes.CDLL`` or None; see :mod:`.build`)."""


def active_isa() -> str | None:
    """The build of the kernel in use (a key of :data:`ISA_FLAGS`), or None where the torch path
    runs."""
    if not available():
        return None
    built = set(_library.built_flags or ())
    return max(
        (isa for isa, flags in ISA_FLAGS.items() if built.issuperset(flags)),
        key=lambda isa: len(ISA_FLAGS[isa]),
    )


def available() -> bool:
    """Whether the native kernel can run here (built on first call)."""
    return _library() is not None


def thresholds(signed: bool) -> Tensor:
    """``(256,)`` fp32: ``T[c]``, the midpoint between codes ``c`` and ``c + 1`` of the dynamic
    map (computed in fp64, rounded to fp32 as the fp16-bits table's); ``T[255] = inf``."""
    from shardflow.ops.quant8 import dynamic_map  # noqa: PLC0415 (quant8 imports this module)

    code = dynamic_map(signed).double()
    mids = ((code[1:] + code[:-1]) / 2).float()
    return torch.cat([mids, torch.tensor([float("inf")])])


def band_constants(signed: bool) -> list[tuple[float, float, float, float]]:
    """Per exponent band ``i`` (``q`` codes from code ``base``): ``(mult, off, lo, hi)``. The
    position of a magnitude is ``|x|·mult − off`` (``mult = 10^(6−i)·q/0.9``, ``off = 0.1·q/0.9
    + ½ − base``): code ``base + k`` of the band at ``base + k``, its midpoints at ``± ½``, so
    the position truncated is the code at or below ``|x|`` (for ``x < 0``: ``253 −`` it);
    ``lo``, ``hi``: the positions of the midpoints to the code below the band (previous band's
    last, or 0) and to the code above it (next band's first, or 1), from :func:`thresholds` in
    fp64. (Positions reach 255.5, where an fp32 ulp is 1.5·10⁻⁵ of a cell.)"""
    mids = thresholds(signed).double()
    out, first = [], 128 if signed else 1
    for i in range(7):
        q = 2 ** (i if signed else i + 1)
        mult, off = 10.0 ** (6 - i) * q / 0.9, 0.1 * q / 0.9 + 0.5 - first
        lo, hi = (float(mids[c]) * mult - off for c in (first - 1, first + q - 1))
        out.append((mult, off, lo, hi))
        first += q
    return out


BAND_EDGES = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]).tolist()
"""The lower edges of bands 1-6 of a normed magnitude, as fp32 values."""


def binade_band(e: int) -> tuple[int, float]:
    """For magnitudes in ``[2^e, 2^(e+1))`` (``e ≤ 0``; ``e = −31``: all below ``2^−30``): the band
    at ``2^e`` and the one band edge inside the binade (a band is wider than a binade), or inf.
    The AVX-512 kernel finds a band from the exponent by this table and one comparison."""
    bottom, top = 2.0**e, 2.0 ** (e + 1)
    inside = [edge for edge in BAND_EDGES if bottom < edge < top]
    return sum(edge <= bottom for edge in BAND_EDGES), (inside[0] if inside else float("inf"))


@functools.cache
def _map(signed: bool) -> tuple[_Map, tuple[Tensor, ...]]:
    """The ``Map`` struct of a dynamic map, and the tensors it points into (kept alive)."""
    from shardflow.ops.quant8 import dynamic_map  # noqa: PLC0415

    code = dynamic_map(signed).contiguous()
    mids = thresholds(signed).contiguous()
    m = _Map()
    for i, (mult, off, lo, hi) in enumerate(band_constants(signed)):
        m.mult[i], m.off[i], m.lo[i], m.hi[i] = mult, off, lo, hi
    for e in range(-31, 1):
        m.band_of[e + 31], m.edge[e + 31] = binade_band(e)
    m.sgn = int(signed)
    planes = code.view(torch.uint8).view(256, 4).t().contiguous()  # little-endian bytes
    ctypes.memmove(m.planes, planes.data_ptr(), 1024)
    m.T, m.map = mids.data_ptr(), code.data_ptr()
    return m, (code, mids)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernel takes these tensors: CPU, contiguous, fp32 (or uint8 codes)."""
    return available() and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.uint8)
        for t in tensors
    )


def quantize_rows(codes: Tensor, absmax: Tensor, x: Tensor, blocks, signed: bool) -> None:
    """Quantize ``x`` ``(rows, code_cols)`` fp32 (padded layout) into ``codes`` and
    ``absmax`` in place."""
    m = _map(signed)[0]
    _library().sf8_quantize_rows(
        0, x.shape[0], _ptr(x), blocks.code_cols, blocks.head_blocks, blocks.blocks,
        _ptr(codes), _ptr(absmax), ctypes.addressof(m),
    )  # fmt: skip


def dequantize_rows(codes: Tensor, absmax: Tensor, blocks, signed: bool, out: Tensor) -> None:
    """Write the fp32 values ``codes`` and ``absmax`` encode into ``out`` ``(rows,
    code_cols)``."""
    m = _map(signed)[0]
    _library().sf8_dequantize_rows(
        0, codes.shape[0], _ptr(codes), _ptr(absmax), blocks.code_cols, blocks.head_blocks,
        blocks.blocks, _ptr(out), ctypes.addressof(m),
    )  # fmt: skip


def step_rows(
    w: Tensor,
    g: Tensor,
    states: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    fold: tuple[Tensor, Tensor] | None,
    scalars: tuple[float, ...],
    blocks,
    *,
    nesterov: bool,
) -> None:
    """DolphinFlow's element-wise step on ``w`` ``(rows, cols)`` with gradient ``g`` and 8-bit
    moments ``states = ((m codes, m absmax), (v codes, v absmax))``, in place: per block,
    dequantize, DolphinFlow's rule (``csrc/dolphinflow_rule.h``, the reference rule's
    operations; ``adaptive_lr`` on), requantize.

    ``scalars``: the reference rule's (:data:`~shardflow.ops.native.dolphinflow.RULE_FIELDS`);
    ``fold``: ⊥Grad's coefficients ``(a, b)`` (contiguous fp32), one per row or one for all
    rows, the gradient being ``a·g − b·w`` (else ``c·g``).
    """
    rule = dolphinflow_native.rule(scalars, nesterov=nesterov)
    (mc, ms), (vc, vs) = states
    fa, fb = (None, None) if fold is None else fold
    stride = 0 if fold is None or fold[0].numel() == 1 else 1
    mm, vm = _map(True)[0], _map(False)[0]
    rows, cols = w.shape
    _library().sf8_step_rows(
        0, rows, _ptr(w), _ptr(g), cols, blocks.code_cols, blocks.head_blocks, blocks.blocks,
        _ptr(mc), _ptr(ms), _ptr(vc), _ptr(vs), _ptr(fa), _ptr(fb), stride,
        ctypes.byref(rule), ctypes.addressof(mm), ctypes.addressof(vm),
    )  # fmt: skip
