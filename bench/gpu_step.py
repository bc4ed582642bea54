"""Optimizer step time on a CUDA device, side by side with torch's fused AdamW and Muon.

Run from the repository root (part 2 of ``bench/gpu_check.sh``)::

    python -m bench.gpu_step                                  # SmolLM2-135M (30 layers), eager
    python -m bench.gpu_step --compiled default --only adamw-fused,df-vector,df-matrix
    python -m bench.gpu_step --dtype fp32,bf16 --out bench/results/gpu-step-h100-<date>.md
    python -m bench.gpu_step --device cpu --layers 1 --vocab 1024 --steps 2 --warmup 1  # runs at all?

``bench/step.py`` is the CPU bench (no device option); this one is standalone so that it can run
on a GPU machine while that file changes. What it measures: ``optimizer.step()`` alone on
SmolLM2-135M's parameter shapes (:mod:`bench.shapes`, default all 30 layers: 134.5 M parameters),
with fixed random gradients set on ``p.grad`` before each step (fresh copies, outside the timing).
Every contender shares one set of parameters and is stepped round-robin (the starting one
rotates each round), so drift on the machine hits them alike. Per step, on CUDA:
``torch.cuda.synchronize()``, a CUDA event, ``step()``, a CUDA event, synchronize; the figure is the
median over ``--steps`` rounds of the events' elapsed time (GPU stream time from the step's first
launch to its last kernel, idle gaps for host work included), with the host wall time beside it.
``--warmup`` rounds run first, untimed; the first step's wall time is reported separately (it
holds ``torch.compile``'s compilation for compiled rows). On ``--device cpu`` the figure is wall time.

Rows (every ShardFlow row gets the routing of :func:`shardflow.optim.routing.param_groups`:
hidden matrices orthogonalized or projected, embedding/tied head and norms element-wise; lr 1e-4,
weight decay 0.01; Newton-Schulz fixed at ``--ns-steps`` for the matrix rows):

- ``adamw-fused`` (the anchor of every ratio), ``adamw-foreach``: ``torch.optim.AdamW``;
- ``muon``: ``torch.optim.Muon`` (its Newton-Schulz in bf16, as shipped) on the hidden matrices
  + fused AdamW on the rest, one step; the anchor of the matrix rows' second ratio;
- ``df-vector``: DolphinFlow ``ortho_mode="vector"``; ``df-matrix``: ``ortho_mode="matrix"``
  with ``ns_dtype=torch.bfloat16`` (the CUDA default);
- ``df8-vector``: DolphinFlow8bit (bitsandbytes' CUDA kernels for the 8-bit moments);
- ``whiteflow``: WhiteFlow, otherwise default arguments (rank 256, projected second moment);
- ``factored-adam``: FactoredAdam, otherwise default arguments (all parameters, one group).

``--compiled off`` (default) passes ``compiled=False`` to every ShardFlow row (their eager /
foreach paths); ``default`` leaves ``compiled=None`` (compiled on CUDA: what a user gets).
``--dtype bf16`` puts the weights (and gradients) in bf16: ShardFlow rows then use their default
``precision`` (Kahan compensation, +2 B/param of state), AdamW and Muon run on bf16 weights as
torch does (no compensation). Several dtypes (``fp32,bf16``) give one table each.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bench.shapes import SMOLLM2_135M, build_model, random_grads
from shardflow.optim import DolphinFlow, FactoredAdam, WhiteFlow
from shardflow.optim.routing import param_groups

LR, WEIGHT_DECAY = 1e-4, 0.01
ROWS = [
    "adamw-fused",
    "adamw-foreach",
    "muon",
    "df-vector",
    "df-matrix",
    "df8-vector",
    "whiteflow",
    "factored-adam",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Contender:
    name: str
    optimizers: list[Any]
    anchor: str | None = None
    """The Muon row this one is also compared with."""
    times: list[float] = field(default_factory=list)
    """Per timed step: device (event) milliseconds on CUDA, wall milliseconds on the CPU."""
    walls: list[float] = field(default_factory=list)
    first: float = 0.0

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_bytes(self) -> int:
        total = 0
        for opt in self.optimizers:
            if hasattr(opt, "state_bytes"):
                total += opt.state_bytes()
                continue
            total += sum(
                v.numel() * v.element_size()
                for s in opt.state.values()
                for v in s.values()
                if isinstance(v, Tensor) and v.numel() > 1
            )
        return total


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, the rest) as :func:`param_groups` routes them."""
    groups = param_groups(model)
    hidden = [p for g in groups if "ortho_mode" not in g for p in g["params"]]
    rest = [p for g in groups if "ortho_mode" in g for p in g["params"]]
    return hidden, rest


def make(name: str, model: nn.Module, ns: int, compiled: bool | None) -> Contender:
    hidden, rest = split(model)
    every = hidden + rest
    adamw: Callable[..., torch.optim.Optimizer] = lambda ps, **kw: torch.optim.AdamW(
        ps, lr=LR, weight_decay=WEIGHT_DECAY, **kw
    )
    fixed_ns = {"ns_min_steps": ns, "ns_max_steps": ns}
    if name == "adamw-fused":
        return Contender(name, [adamw(every, fused=True)])
    if name == "adamw-foreach":
        return Contender(name, [adamw(every, foreach=True)])
    if name == "muon":
        muon = torch.optim.Muon(hidden, lr=LR, weight_decay=WEIGHT_DECAY, ns_steps=ns)
        return Contender(name, [muon, adamw(rest, fused=True)])
    common = {"lr": LR, "weight_decay": WEIGHT_DECAY, "compiled": compiled}
    if name == "df-vector":
        return Contender(name, [DolphinFlow(param_groups(model), ortho_mode="vector", **common)])
    if name == "df-matrix":
        opt = DolphinFlow(
            param_groups(model),
            ortho_mode="matrix",
            ns_dtype=torch.bfloat16,
            **fixed_ns,
            **common,
        )
        return Contender(name, [opt], anchor="muon")
    if name == "df8-vector":
        from shardflow.optim.dolphinflow8bit import DolphinFlow8bit  # noqa: PLC0415 - needs bnb

        return Contender(
            name, [DolphinFlow8bit(param_groups(model), ortho_mode="vector", **common)]
        )
    if name == "whiteflow":
        return Contender(name, [WhiteFlow(param_groups(model), **common)])
    if name == "factored-adam":
        return Contender(name, [FactoredAdam(every, **common)])
    raise ValueError(f"unknown row {name!r}: choose from {', '.join(ROWS)}")


def run(contenders: list[Contender], model: nn.Module, grads: dict[str, Tensor], args) -> None:
    cuda = args.device == "cuda"
    params = list(model.named_parameters())
    n = len(contenders)
    for r in range(args.warmup + args.steps):
        t_round = time.perf_counter()
        for k in range(n):
            c = contenders[(r + k) % n]
            for name, p in params:
                p.grad = grads[name].clone()
            if cuda:
                torch.cuda.synchronize()
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                t0 = time.perf_counter()
                start.record()
                c.step()
                end.record()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
                device_ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                c.step()
                wall = device_ms = (time.perf_counter() - t0) * 1e3
            if r == 0:
                c.first = wall
            if r >= args.warmup:
                c.times.append(device_ms)
                c.walls.append(wall)
        kind = "warm-up" if r < args.warmup else "timed"
        print(
            f"  round {r + 1}/{args.warmup + args.steps} ({kind}): "
            f"{time.perf_counter() - t_round:.2f} s",
            flush=True,
        )
    for name, p in params:
        if not torch.isfinite(p).all():
            raise RuntimeError(f"parameter {name} is not finite after the run")
    for c in contenders:
        skipped = sum(getattr(o, "nonfinite_steps", 0) for o in c.optimizers)
        if skipped:
            raise RuntimeError(f"{c.name} skipped {skipped} steps on non-finite gradients")


def table(contenders: list[Contender], n_params: int, cuda: bool) -> list[str]:
    by = {c.name: c for c in contenders}
    base = statistics.median(by["adamw-fused"].times) if "adamw-fused" in by else None
    what = "device ms (CUDA events)" if cuda else "ms"
    lines = [
        f"| row | median {what} | min | median wall ms | first step s | × AdamW fused "
        "| × Muon | state B/param |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        med = statistics.median(c.times)
        anchor = by.get(c.anchor) if c.anchor else None
        lines.append(
            f"| {c.name} | {med:.3f} | {min(c.times):.3f} | {statistics.median(c.walls):.3f} | "
            f"{c.first / 1e3:.2f} | {f'{med / base:.2f}' if base else '–'} | "
            f"{f'{med / statistics.median(anchor.times):.2f}' if anchor else '–'} | "
            f"{c.state_bytes() / n_params:.2f} |"
        )
    return lines


def bench_dtype(key: str, args) -> list[str]:
    shapes = SMOLLM2_135M.with_layers(args.layers)
    if args.vocab:
        shapes = dataclasses.replace(shapes, vocab=args.vocab)
    model = build_model(shapes, device=args.device, dtype=DTYPES[key], seed=0)
    grads = random_grads(model, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    compiled = {"off": False, "default": None, "on": True}[args.compiled]
    contenders, notes = [], []
    for name in args.only:
        try:
            contenders.append(make(name, model, args.ns_steps, compiled))
        except ImportError as exc:
            notes.append(f"- {name}: skipped ({exc})")
    print(f"{key}: {n_params / 1e6:.1f} M params, rows {[c.name for c in contenders]}", flush=True)
    run(contenders, model, grads, args)
    out = [f"### weights {key}, compiled={args.compiled}", ""]
    out += table(contenders, n_params, args.device == "cuda")
    if torch.cuda.is_available() and args.device == "cuda":
        out.append("")
        out.append(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    out += notes
    del contenders, model, grads
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2-135M layers (30 = the model)")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (median over them)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--ns-steps", type=int, default=5)
    ap.add_argument("--only", default=",".join(ROWS), help="comma list of rows")
    ap.add_argument("--dtype", default="fp32", help="comma list of fp32, bf16")
    ap.add_argument("--compiled", default="off", choices=["off", "default", "on"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    ap.add_argument("--vocab", type=int, default=0, help="a smaller vocabulary (CPU tests)")
    ap.add_argument("--out", default="", help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in ROWS]
    dtypes = [s.strip() for s in args.dtype.split(",") if s.strip()]
    bad += [s for s in dtypes if s not in DTYPES]
    if bad:
        ap.error(f"unknown {bad}: rows are {ROWS}, dtypes {list(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_step: CUDA is not available (torch {torch.__version__}); nothing run.")
        return 2
    machine = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    head = [
        "# gpu_step: optimizer step time",
        "",
        f"- command: `python -m bench.gpu_step {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- machine: {machine}; torch {torch.__version__}; {datetime.date.today().isoformat()}",
        f"- SmolLM2-135M shapes, {args.layers} layers; {args.steps} timed rounds after "
        f"{args.warmup} warm-up; Newton-Schulz {args.ns_steps} steps",
        "",
    ]
    print("\n".join(head), flush=True)
    body = []
    for key in dtypes:
        part = bench_dtype(key, args) + [""]
        print("\n".join(part), flush=True)
        body += part
        if args.out:  # after each table: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n".join(head + body) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
