"""Single kernels of ShardFlow's CPU steps against torch's, on one 28 M-element tensor.

Run from the repository root::

    /work/venv/bin/python -m bench.kernels [--threads T]

Two questions, each answered side by side in one process (minimum over ``--reps`` calls, a
64 MiB buffer rewritten before each call so that no operand is in cache):

- **norm pass**: ``‖g‖²`` of the SmolLM2 embedding's gradient (49152×576 fp32) by a BLAS dot
  (the base's :func:`shardflow.optim.base._sq_norms` for what the native kernel does not take),
  by DolphinFlow's compiled :func:`~shardflow.optim.dolphinflow.sq_norms_each` (four streams
  read at once) and by :mod:`shardflow.ops.native.norm` (the base's pass for contiguous fp32
  CPU gradients; four streams, fp64 sums).
- **update**: DolphinFlow's compiled element-wise pass (:func:`dolphinflow_rule_each`, the
  reference rule compiled; Nesterov, no ⊥Grad) and its native kernel
  (:mod:`shardflow.ops.native.dolphinflow`, the CPU default) against ``torch._fused_adamw_``
  on the same size, with the compiled graph built first
  on a 1000-element tensor (as when a small parameter comes first): with
  ``cpp.dynamic_threads`` (what :mod:`shardflow.ops.compiling` sets) and without it (inductor
  then decides the loop's threading from that first call's size).
- **DolphinFlow8bit's native step** (:func:`shardflow.ops.native.quant8.step_rows`: dequantize
  both 8-bit moments, DolphinFlow's element-wise rule, requantize) on the same 49152×576 matrix,
  in each build this CPU runs (AVX2, AVX-512, AVX-512 VBMI), in the same table: the anchor for
  it is DolphinFlow's compiled pass (fp32 moments). Also the AVX2 build with its two decode
  gathers replaced by ``code × scale`` (wrong values, timing only): what the gathers cost.
- **FactoredAdam's native kernel** (:func:`shardflow.ops.native.factored.adam_many`) on the
  same 49152×576 matrix against ``torch._fused_adamw_``, as shipped and built without its
  prefetch (the loop then reads a matrix that is not in cache with too few loads in flight).
- **stochastic rounding** of a group's bf16 factors (SmolLM2-135M's 211 matrices: their row and
  column factors, 0.27 M values) in one batch of torch ops and by
  :mod:`shardflow.ops.native.rounding`.

Results are printed as Markdown; keep them under ``bench/results/`` with the command, machine
and date.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench.factored import smollm2_135m_shapes
from shardflow.ops import quant8
from shardflow.ops.native import dolphinflow as dolphinflow_native
from shardflow.ops.native import factored as factored_native
from shardflow.ops.native import norm as norm_native
from shardflow.ops.native import quant8 as quant8_native
from shardflow.ops.native import rounding as rounding_native
from shardflow.ops.native.build import FLAGS, NativeLibrary
from shardflow.optim import factored
from shardflow.optim.dolphinflow import dolphinflow_rule_each, sq_norms_each

SCALARS = (0.99, 0.05, 0.95, 0.999, 1e-3, 1e-3, 1e-8, 1.0)
"""One step's scalars of the rule (decay, 1 − μ, μ, β₂, 1 − β₂, scale, eps, c)."""

N = 49152 * 576


def _best(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    evict = torch.empty(16 << 20)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _update_kernel(dynamic_threads: bool) -> Callable[..., None]:
    options = {"cpp.dynamic_threads": dynamic_threads}
    kernel = torch.compile(dolphinflow_rule_each, dynamic=True, fullgraph=True, options=options)
    small = [[torch.rand(1000)] for _ in range(4)]
    kernel(*small, [torch.tensor(SCALARS)], nesterov=True)
    return kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=12, help="calls per kernel (minimum over them)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, {N} fp32 elements\n")

    g = torch.randn(N)
    norms = torch.compile(sq_norms_each, dynamic=True, options={"cpp.dynamic_threads": True})
    norms([torch.randn(1000)])
    fns = {
        "BLAS dot": lambda: torch.dot(g, g),
        "sq_norms_each": lambda: norms([g]),
        "norm_native": lambda: norm_native.sq_norms([g]),
    }
    best = _best(fns, args.reps)
    print("| norm pass (reads 4 B/element) | min ms | GB/s |\n|---|---:|---:|")
    for name, sec in best.items():
        print(f"| {name} | {sec * 1e3:.2f} | {N * 4 / sec / 1e9:.1f} |")

    w, m, v = torch.randn(N), torch.randn(N), torch.rand(N)
    scalars = [torch.tensor(SCALARS)]
    step = [torch.tensor(5.0)]
    with_threads, without = _update_kernel(True), _update_kernel(False)
    fns = {
        "torch._fused_adamw_": lambda: torch._fused_adamw_(
            [w],
            [g],
            [m],
            [v],
            [],
            step,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.01,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        ),  # fmt: skip
        "dolphinflow_rule_each, cpp.dynamic_threads": lambda: with_threads(
            [w], [g], [m], [v], scalars, nesterov=True
        ),
        "dolphinflow_rule_each, threading from the first call": lambda: without(
            [w], [g], [m], [v], scalars, nesterov=True
        ),
    }
    if dolphinflow_native.available():
        fns["DolphinFlow native step (fp32 moments)"] = lambda: dolphinflow_native.step(
            w, g, m, v, SCALARS, nesterov=True
        )
    fns.update(_quant8(w, g))
    fns.update(_factored(w, g))
    best = _best(fns, args.reps)
    base = best["torch._fused_adamw_"]
    print("\n| update | min ms | × fused AdamW |\n|---|---:|---:|")
    for name, sec in best.items():
        print(f"| {name} | {sec * 1e3:.2f} | {sec / base:.2f} |")

    best = _best(_rounding(), args.reps)
    print("\n| stochastic rounding, 211 matrices' factors | min ms |\n|---|---:|")
    for name, sec in best.items():
        print(f"| {name} | {sec * 1e3:.3f} |")


def _quant8(w: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], object]]:
    """DolphinFlow8bit's native fused step on ``w`` viewed as 49152×576 (Nesterov, no ⊥Grad),
    in each build of the kernel this CPU runs."""
    rows, cols = 49152, 576
    blocks = quant8.RowBlocks(cols)
    states = []
    for signed, x in (
        (True, torch.randn(rows, cols) * 1e-3),
        (False, torch.rand(rows, cols) * 1e-6),
    ):
        codes, absmax = quant8.empty_state(rows, blocks, w.device)
        quant8.quantize_(codes, absmax, x, blocks, signed)
        states.append((codes, absmax))
    shipped = quant8_native._library
    gather = "_mm256_i32gather_ps(map, c, 4)"
    assert gather in shipped.source
    no_gathers = shipped.variant(
        "quant8_nogather", replace=(gather, "_mm256_cvtepi32_ps(c)"), flags=FLAGS
    )
    libraries = {isa: quant8_native.library(isa) for isa in quant8_native.host_isas()}
    libraries["avx2 without its decode gathers (timing only)"] = no_gathers

    def run(lib: NativeLibrary) -> None:
        quant8_native._library = lib
        quant8_native.step_rows(
            w.view(rows, cols),
            g.view(rows, cols),
            tuple(states),
            None,
            (1.0, *SCALARS[1:]),
            blocks,
            nesterov=True,
        )
        quant8_native._library = shipped

    return {
        f"DolphinFlow8bit native step, {name} (reads w g, writes w; 2 code bytes)": (
            lambda lib=lib: run(lib)
        )
        for name, lib in libraries.items()
    }


def _factored(w: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], object]]:
    """FactoredAdam's native kernel on ``w`` viewed as 49152×576, with and without prefetch."""
    rows, cols = 49152, 576
    job = factored_native.Job(
        w.view(rows, cols),
        g.view(rows, cols),
        (torch.rand(rows).bfloat16(), torch.rand(rows) * 1e-2),
        (torch.rand(cols).bfloat16(), torch.rand(cols)),
        torch.zeros(rows, cols // 8, dtype=torch.uint8),
        (1.0, 0.1, 0.999, 0.5, 1e-8, 0.999, 1e-3),
    )
    shipped = factored_native._library
    prefetch = "_mm_prefetch((const char*)(x + AHEAD), _MM_HINT_T0);"
    assert prefetch in shipped.source
    plain = shipped.variant("factored_noprefetch", replace=(prefetch, ""))

    def run(lib: NativeLibrary) -> None:
        factored_native._library = lib
        factored_native.adam_many([job])
        factored_native._library = shipped

    return {
        "FactoredAdam native (reads w g, writes w; 1 bit + factors)": lambda: run(shipped),
        "the same without prefetch": lambda: run(plain),
    }


def _rounding() -> dict[str, Callable[[], object]]:
    sizes = [n for s in smollm2_135m_shapes().values() if len(s) == 2 for n in s]
    items = [
        (torch.empty(n, dtype=torch.bfloat16), torch.rand(n), i, 0) for i, n in enumerate(sizes)
    ]

    def torch_batch() -> None:
        usable = rounding_native.usable
        rounding_native.usable = lambda *a: False
        factored._store_bf16_many(items)
        rounding_native.usable = usable

    return {
        "torch ops, one batch": torch_batch,
        "rounding_native": lambda: factored._store_bf16_many(items),
    }


if __name__ == "__main__":
    main()
