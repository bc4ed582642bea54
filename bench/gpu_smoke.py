"""A correctness smoke test of every ShardFlow optimizer on a CUDA device (not a benchmark).

Run from the repository root (part 1 of ``bench/gpu_check.sh``)::

    python -m bench.gpu_smoke                          # CUDA, compiled=False (eager/foreach paths)
    python -m bench.gpu_smoke --compiled default       # CUDA, compiled=None: torch.compile on CUDA
    python -m bench.gpu_smoke --device cpu --perturb 1e-6   # CPU only: calibrates the tolerances

About 20-60 s on a GPU machine in eager mode (most of it CUDA start-up and the CPU reference
runs); with ``--compiled default`` add the compilation (one graph per pass and variant).

What it checks, for each optimizer below, on a tiny token model (embedding 64×64, a 64→256→64
MLP with a bias, an RMSNorm, an untied 64×64 head: every routing — element-wise embedding, head,
norm and bias, orthogonalized or projected hidden matrices) trained for ``--steps`` (20) steps on
a learnable token map, with weights in fp32 and in bf16 (default ``precision``: Kahan):

- no NaN/inf in the losses or the weights, and no skipped step;
- the loss goes down: the mean of the last 3 losses is below ``--drop`` (0.8) × the first;
- bf16 weights: every bf16 parameter has a ``kahan`` compensation buffer in the optimizer's state
  (the default precision for low-precision weights);
- fp32 weights: the device's weights agree with the same run on the CPU. The measure is
  ``max |w_dev − w_cpu| / max |w_cpu − w_0|`` over the parameters — the disagreement relative to
  how far the run moved the weights — and must be at most the row's tolerance: 1e-3 for the
  deterministic rules (the two runs differ only by float summation order: the forward/backward
  pass and the reductions run in another order on CUDA), 3e-2 where state is rounded to discrete
  values (bf16 states rounded stochastically, packed signs), 1e-1 for 8-bit codes: there one ulp
  of difference can flip a rounding or a code, and the max picks the worst element. bf16 runs
  print the same measure, unchecked (bf16 forward passes differ by far more between devices).
  Newton-Schulz runs in fp32 on both devices for the comparison (``ns_dtype=torch.float32``);
  one extra row keeps the CUDA default (bf16 Newton-Schulz) and is checked for finiteness and a
  falling loss only.

``--device cpu --perturb 1e-6`` runs the same comparison on the CPU against a twin whose
gradients get relative noise of that size at every step (standing in for CUDA's summation order;
fp32 rounding is ~6e-8). Measured on the 2-core development CPU (2026-12, 20 steps, lr 3e-3):
with noise 1e-6 the deterministic rules gave 4e-6 to 2e-5 (tolerance 1e-3), WhiteFlow and the
factored optimizers 1e-6 to 2.4e-3 (3e-2), DolphinFlow8bit 2.3e-2 (1e-1); with noise 1e-7,
DolphinFlow8bit gave 4e-3 to 2e-2 — a single code flip, whatever the noise size.

Exit status 0 when every row passes, 1 otherwise; rows whose package is missing (bitsandbytes for
DolphinFlow8bit) are reported as skipped. ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardflow.optim import (
    DolphinFlow,
    FactoredAdam,
    FactoredAdopt,
    FactoredProdigy,
    WhiteFlow,
    param_groups,
)

VOCAB, DIM, HIDDEN, BATCH = 64, 64, 256, 256
LR = 3e-3
"""Small enough that 20 steps stay far from a solved task (a solved task's updates are noise)."""
EXACT, DISCRETE, CODES8 = 1e-3, 3e-2, 1e-1
"""Tolerances of the fp32 device-vs-CPU measure (see the module docstring)."""


class Tiny(nn.Module):
    """Embedding → residual MLP (with a bias) → RMSNorm → untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=True)
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(F.gelu(self.up(h)))
        return self.lm_head(self.norm(h)).float()


def _dolphinflow8bit(params: Any, **kw: Any) -> torch.optim.Optimizer:
    from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: PLC0415 - needs bnb

    return DolphinFlow8bit(params, **kw)


@dataclass
class Row:
    name: str
    factory: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any]
    tol: float = EXACT
    routed: bool = True
    """Pass :func:`param_groups` (hidden matrices vs element-wise) instead of all parameters."""
    compare: bool = True
    """Compare the fp32 run with the CPU (False: the row's settings differ on purpose)."""
    needs: str | None = None


FP32_NS = {"ns_dtype": torch.float32}
ROWS = [
    Row("dolphinflow-vector", DolphinFlow, {"lr": LR, "ortho_mode": "vector"}),
    Row(
        "dolphinflow-block",
        DolphinFlow,
        {"lr": LR, "ortho_mode": "block", "block_size": 32, **FP32_NS},
    ),
    Row("dolphinflow-matrix", DolphinFlow, {"lr": LR, "ortho_mode": "matrix", **FP32_NS}),
    Row(
        "dolphinflow-matrix-nsdefault",
        DolphinFlow,
        {"lr": LR, "ortho_mode": "matrix"},
        compare=False,
    ),
    Row(
        "dolphinflow8bit-vector",
        _dolphinflow8bit,
        {"lr": LR, "ortho_mode": "vector", "min_8bit_size": 0},
        tol=CODES8,
        needs="bitsandbytes",
    ),
    Row(
        "dolphinflow8bit-matrix",
        _dolphinflow8bit,
        {"lr": LR, "ortho_mode": "matrix", "min_8bit_size": 0, **FP32_NS},
        tol=CODES8,
        needs="bitsandbytes",
    ),
    Row("whiteflow", WhiteFlow, {"lr": LR, "rank": 8, "proj_update_freq": 5}, tol=DISCRETE),
    Row("factored-adam", FactoredAdam, {"lr": LR}, tol=DISCRETE, routed=False),
    Row("factored-adopt", FactoredAdopt, {"lr": LR}, tol=DISCRETE, routed=False),
    Row("factored-prodigy", FactoredProdigy, {"d0": 1e-4}, tol=DISCRETE, routed=False),
]


@dataclass
class Run:
    losses: list[float]
    weights: dict[str, torch.Tensor]
    """Final weights, fp32, on the CPU."""
    skipped: int
    kahan_missing: list[str] = field(default_factory=list)
    seconds: float = 0.0


def batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (BATCH,), generator=gen)
    return x.to(device), ((x * 7 + 3) % VOCAB).to(device)


def initial_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {n: p.detach().to(dtype).float() for n, p in Tiny().named_parameters()}


def train(
    row: Row, device: str, dtype: torch.dtype, steps: int, compiled: bool | None, perturb: float
) -> Run:
    torch.manual_seed(0)
    model = Tiny().to(device=device, dtype=dtype)
    params = param_groups(model) if row.routed else model.parameters()
    opt = row.factory(params, compiled=compiled, **row.kwargs)
    x, y = batch(device)
    noise = torch.Generator().manual_seed(2)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if perturb:
            for p in model.parameters():
                r = torch.randn(p.shape, generator=noise).to(p.device, p.dtype)
                p.grad.mul_(1 + perturb * r)
        opt.step()
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    low = [n for n, p in model.named_parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    kahan_missing = [
        n for n in low if "kahan" not in opt.state.get(dict(model.named_parameters())[n], {})
    ]
    weights = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    return Run(losses, weights, getattr(opt, "nonfinite_steps", 0), kahan_missing, seconds)


def disagreement(a: Run, b: Run, w0: dict[str, torch.Tensor]) -> float:
    """``max |a − b| / max |b − w0|`` over every parameter."""
    diff = max((a.weights[n] - b.weights[n]).abs().max().item() for n in w0)
    moved = max((b.weights[n] - w0[n]).abs().max().item() for n in w0)
    return diff / moved if moved > 0 else math.inf


def check(run: Run, drop: float) -> list[str]:
    """What is wrong with one run (empty: nothing)."""
    problems = []
    if not all(math.isfinite(v) for v in run.losses):
        problems.append("non-finite loss")
    if not all(torch.isfinite(w).all() for w in run.weights.values()):
        problems.append("non-finite weights")
    if run.skipped:
        problems.append(f"{run.skipped} skipped steps")
    tail = sum(run.losses[-3:]) / len(run.losses[-3:])
    if not tail < drop * run.losses[0]:
        problems.append(f"loss did not fall below {drop}x: {run.losses[0]:.3f} -> {tail:.3f}")
    if run.kahan_missing:
        problems.append(f"no kahan state for {', '.join(run.kahan_missing)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--compiled",
        default="off",
        choices=["off", "default", "on"],
        help="compiled=False (off), None (default: compiled on CUDA), True (on)",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--only", default="", help="comma list of row names (default: all)")
    ap.add_argument("--drop", type=float, default=0.8)
    ap.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="--device cpu: relative gradient noise of the twin run (tolerance calibration)",
    )
    ap.add_argument("--json", default="", help="write the rows here")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the model is tiny; 1 is fastest)"
    )
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available (torch " + torch.__version__ + "); nothing run.")
        return 2
    torch.set_num_threads(args.threads)
    compiled = {"off": False, "default": None, "on": True}[args.compiled]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    chosen = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {r.name for r in ROWS}
    if unknown:
        ap.error(f"--only: unknown rows {sorted(unknown)}; choose from {[r.name for r in ROWS]}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"gpu_smoke: torch {torch.__version__}, device {args.device} ({device_name}), "
        f"compiled={compiled}, {args.steps} steps, reference: "
        + (f"cpu with gradient noise {args.perturb:g}" if args.device == "cpu" else "cpu"),
        flush=True,
    )
    rows_out, failed = [], 0
    header = (
        "| optimizer | dtype | loss first → last | dev s | vs cpu | tol | result |\n"
        "|---|---|---|---:|---:|---:|---|"
    )
    print(header, flush=True)
    for row in ROWS:
        if only and row.name not in only:
            continue
        if row.needs:
            try:
                __import__(row.needs)
            except ImportError:
                print(f"| {row.name} | – | – | – | – | – | skipped: {row.needs} not installed |")
                rows_out.append({"name": row.name, "result": f"skipped: no {row.needs}"})
                continue
        for key in chosen:
            dtype = dtypes[key]
            out: dict[str, Any] = {"name": row.name, "dtype": key}
            try:
                dev = train(row, args.device, dtype, args.steps, compiled, 0.0)
                problems = check(dev, args.drop)
                measure = None
                if row.compare:
                    perturb = args.perturb if args.device == "cpu" else 0.0
                    ref = train(row, "cpu", dtype, args.steps, compiled, perturb)
                    measure = disagreement(dev, ref, initial_weights(dtype))
                    if key == "fp32" and not measure <= row.tol:
                        problems.append(f"differs from cpu: {measure:.2e} > {row.tol:g}")
                out.update(
                    losses=[dev.losses[0], dev.losses[-1]],
                    seconds=dev.seconds,
                    vs_cpu=measure,
                    tol=row.tol if key == "fp32" and row.compare else None,
                    problems=problems,
                )
            except Exception as exc:  # noqa: BLE001 - a smoke test reports and goes on
                problems = [f"{type(exc).__name__}: {exc}".splitlines()[0][:300]]
                out.update(problems=problems)
                dev, measure = None, None
            failed += bool(problems)
            result = "ok" if not problems else "FAIL: " + "; ".join(problems)
            out["result"] = result
            rows_out.append(out)
            loss = f"{dev.losses[0]:.3f} → {dev.losses[-1]:.3f}" if dev else "–"
            secs = f"{dev.seconds:.2f}" if dev else "–"
            vs = "–" if measure is None else f"{measure:.2e}"
            tol = f"{row.tol:g}" if key == "fp32" and row.compare else "(report)"
            print(f"| {row.name} | {key} | {loss} | {secs} | {vs} | {tol} | {result} |", flush=True)
    print(f"gpu_smoke: {failed} failing run(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device_name, "compiled": args.compiled, "rows": rows_out}, f, indent=1
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
