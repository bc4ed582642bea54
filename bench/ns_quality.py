"""Newton-Schulz quality per iteration and per second: Muon's fixed quintic vs Polar Express.

For every distinct hidden-matrix shape of the chosen models (:mod:`bench.shapes`; a tall matrix
and its transpose are one shape, the iteration runs on the short side) and two inputs —

- ``gaussian``: i.i.d. normal entries (a flat, Marchenko-Pastur spectrum);
- ``power``: singular values ``σᵢ = 1/i`` on random singular vectors (the heavy-tailed, nearly
  low-rank spectrum of a gradient or momentum matrix) —

it runs the iteration of :func:`shardflow.ops.orthogonalize.newton_schulz` step by step
(:func:`~shardflow.ops.orthogonalize.ns_start`, :func:`~shardflow.ops.orthogonalize.ns_iterate`:
the op's own code) in each compute dtype, for each coefficient schedule, and records after every
iteration ``k``:

- ``e``: the orthogonality error ``‖XXᵀ − I‖_F/√k`` (the RMS of ``σ² − 1``; the adaptive
  criterion's measure), computed in float64 from the iterate;
- ``σ_min``, ``σ_max``: the spread of the singular values around 1 (float64 ``eigvalsh`` of
  ``XXᵀ``);
- the time of the iteration's matmuls (``gram`` and ``ns_iterate``), median of ``--reps``.

Shapes whose short side exceeds ``--max-side`` (Llama-3-8B's 4096-wide ones: 0.4–1.1 TFLOP per
iteration, minutes on a 2-core CPU) are measured in *spectral* form: the iteration's scalar
polynomial applied in float64 to the input's singular values, which is what the matrix iteration
computes in exact arithmetic (the fp32 rows of the matrix shapes check the two agree); no bf16
rounding and no time for them.

Run from the repository root::

    python -m bench.ns_quality --models smollm2-135m --dtypes float32,bfloat16
    python -m bench.ns_quality --models llama3-8b --dtypes float32 --out FILE.md
    python -m bench.ns_quality --models smollm2-135m --shapes 192x576 --dtypes bfloat16

It prints Markdown tables (and writes them to ``--out`` with a JSON of every number beside it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from bench.common import run_meta, write_results
from bench.shapes import SHAPES
from shardflow.ops.orthogonalize import NS_SCHEDULES, NS_TOL, ns_coefficients, ns_iterate, ns_start

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def distinct_shapes(model: str) -> dict[tuple[int, int], list[str]]:
    """``(short, long) → parameter names`` of one layer's hidden matrices."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, shape in SHAPES[model].layer_shapes().items():
        if len(shape) == 2:
            out.setdefault((min(shape), max(shape)), []).append(name.split(".")[1])
    return out


def make_input(kind: str, short: int, long: int, seed: int = 0) -> torch.Tensor:
    """A ``(short, long)`` float32 input of the named kind (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(short, long, generator=gen)
    u, _ = torch.linalg.qr(torch.randn(short, short, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(long, short, generator=gen, dtype=torch.float64))
    sigma = 1.0 / torch.arange(1, short + 1, dtype=torch.float64)
    return ((u * sigma) @ v.T).float()


def input_singular_values(kind: str, short: int, long: int, seed: int = 0) -> torch.Tensor:
    """Singular values of :func:`make_input` in float64, without forming it when they are known."""
    if kind == "power":
        return 1.0 / torch.arange(1, short + 1, dtype=torch.float64)
    x = make_input(kind, short, long, seed)
    gram = (x @ x.T).double()
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def spread(y: torch.Tensor) -> tuple[float, float, float]:
    """``(e, σ_min, σ_max)`` of an iterate on its short side, in float64."""
    y = y.double()
    gram = y @ y.T
    k = y.shape[0]
    e = torch.linalg.matrix_norm(gram - torch.eye(k, dtype=y.dtype)) / math.sqrt(k)
    s2 = torch.linalg.eigvalsh(gram).clamp_min(0)
    return float(e), float(s2.min().sqrt()), float(s2.max().sqrt())


def trace_matrix(x: torch.Tensor, coeffs: str, dtype: torch.dtype, steps: int, reps: int):
    """Rows ``(k, e, σ_min, σ_max, seconds of iteration k)`` of the op's iteration on ``x``."""
    rows = []
    y = ns_start(x, coeffs=coeffs, dtype=dtype)
    for k, abc in enumerate(ns_coefficients(coeffs, steps), start=1):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            nxt = ns_iterate(y, y @ y.mT, abc)
            times.append(time.perf_counter() - t0)
        y = nxt
        rows.append((k, *spread(y), statistics.median(times)))
    return rows


def trace_spectral(sigma: torch.Tensor, coeffs: str, steps: int):
    """The same rows from the scalar polynomial on the singular values (exact arithmetic)."""
    scale = 1.01 if coeffs == "polar_express" else 1.0  # ns_start's safety factor
    x = sigma / (sigma.square().sum().sqrt() * scale)
    rows = []
    for k, (a, b, c) in enumerate(ns_coefficients(coeffs, steps), start=1):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
        e = float((x.square() - 1).square().mean().sqrt())
        rows.append((k, e, float(x.min()), float(x.max()), None))
    return rows


def stop_step(rows, min_steps: int, max_steps: int, tol: float) -> int:
    """Iterations the adaptive criterion runs: the first ``k ≥ min_steps`` whose iterate has
    ``e ≤ tol`` (checked on the gram of the next iteration), else ``max_steps``."""
    for k, e, *_ in rows:
        if min_steps <= k < max_steps and e <= tol:
            return k
    return max_steps


def run(args) -> dict:
    results = []
    for model in args.models:
        for (short, long), names in distinct_shapes(model).items():
            if args.shapes and f"{short}x{long}" not in args.shapes:
                continue
            spectral = short > args.max_side
            for kind in args.inputs:
                x = None if spectral else make_input(kind, short, long)
                sigma = input_singular_values(kind, short, long) if spectral else None
                for dname in ["float64 (spectral)"] if spectral else args.dtypes:
                    for coeffs in NS_SCHEDULES:
                        if spectral:
                            rows = trace_spectral(sigma, coeffs, args.steps)
                        else:
                            rows = trace_matrix(x, coeffs, DTYPES[dname], args.steps, args.reps)
                        results.append(
                            dict(
                                model=model,
                                shape=[short, long],
                                params=names,
                                input=kind,
                                dtype=dname,
                                coeffs=coeffs,
                                rows=rows,
                                adaptive_stop=stop_step(rows, 3, 5, NS_TOL),
                            )
                        )
                        print(_line(results[-1]), flush=True)
    return {"results": results}


def _line(r: dict) -> str:
    es = " ".join(f"{row[1]:.3f}" for row in r["rows"])
    return f"{r['model']} {r['shape']} {r['input']} {r['dtype']} {r['coeffs']}: e = {es}"


def markdown(data: dict, steps: int) -> str:
    head = "| shape (params) | input | dtype | coeffs | " + " | ".join(
        f"e@{k}" for k in range(1, steps + 1)
    )
    head += " | σ range @5 | σ range @6 | stop (3..5, tol 0.35) | ms/iter |"
    lines = [head, "|" + "---|" * (steps + 8)]
    for r in data["results"]:
        rows = r["rows"]
        es = " | ".join(f"{row[1]:.3f}" for row in rows)
        rng = [f"[{rows[i][2]:.2f}, {rows[i][3]:.2f}]" if len(rows) > i else "" for i in (4, 5)]
        ms = [row[4] for row in rows if row[4] is not None]
        t = f"{1e3 * statistics.median(ms):.1f}" if ms else "—"
        shape = f"{r['shape'][0]}×{r['shape'][1]} ({', '.join(r['params'])})"
        lines.append(
            f"| {shape} | {r['input']} | {r['dtype']} | {r['coeffs']} | {es} | {rng[0]} | "
            f"{rng[1]} | {r['adaptive_stop']} | {t} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2-135m,llama3-8b", type=lambda s: s.split(","))
    p.add_argument("--inputs", default="gaussian,power", type=lambda s: s.split(","))
    p.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    p.add_argument("--shapes", default="", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = run(args)
    data["meta"] = run_meta(
        "bench.ns_quality", args, seconds=round(time.perf_counter() - started, 1)
    )
    table = markdown(data, args.steps)
    print(table)
    write_results(args.out, table, data)


if __name__ == "__main__":
    main()
