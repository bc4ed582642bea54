"""Low-precision weights: step time against optimi's Kahan AdamW, and convergence per precision.

Run from the repository root::

    python -m bench.precision step                   # bf16 step time, 1 thread, ~2 min
    python -m bench.precision step --threads 2 --layers 2
    python -m bench.precision convergence            # 6 optimizers x 4 precisions, ~40 min
    python -m bench.precision convergence --optimizers dolphinflow --steps 200

**step** — the median wall time of ``optimizer.step()`` alone on bf16 weights of SmolLM2-135M's
shapes (4 layers + the embedding: 42.5 M parameters; fixed random gradients), the optimizers
stepped round-robin in one process so that load on the machine hits them alike:

- torch-optimi 0.3 ``AdamW(kahan_sum=True)`` (foreach) — the anchor the issue names;
- ``torch.optim.AdamW(fused=True)`` on the same bf16 weights (no compensation: round to nearest);
- ShardFlow's DolphinFlow (vector mode on the hidden matrices, element-wise elsewhere), with its
  default arguments (``precision="kahan"`` for bf16 weights) and with ``precision="sr"``;
- FactoredAdam with its defaults (Kahan) and with ``precision="sr"`` (rounded in its own pass).

Ratios are against optimi's Kahan AdamW. optimi is a benchmark-only anchor, installed with
``pip install --no-deps torch-optimi`` (it is pure Python; ``--no-deps`` keeps torch as it is);
without it its row is skipped with a note.

**convergence** — the quickstart model (``configs/quickstart.toml``) for ``--steps`` steps in one
process, each optimizer at one learning rate, with fp32 weights and with bf16 weights under each
``precision``; the final validation loss per run, and the relative gap of each bf16 run to the
fp32 run of the same optimizer. Runs go through ``launch/compare.py`` (as ``bench/convergence``).

Results go to ``bench/results/precision-{step,convergence}-<tag>-<date>.md`` with the command,
machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.convergence import _machine  # noqa: E402
from bench.shapes import SMOLLM2_135M, build_model, random_grads  # noqa: E402
from shardflow.optim.routing import param_groups  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRECISIONS = ("kahan", "sr", "nearest")
CONVERGENCE_OPTIMIZERS = "dolphinflow,dolphinflow8bit,whiteflow,factored_adam,factored_adopt"


# -- step time --------------------------------------------------------------------------------


def _step_rows(model: torch.nn.Module, lr: float) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    import shardflow  # noqa: PLC0415

    params = list(model.parameters())
    rows: dict[str, Callable[[], torch.optim.Optimizer]] = {}
    try:
        import optimi  # noqa: PLC0415

        rows["optimi AdamW kahan (anchor)"] = lambda: optimi.AdamW(
            params, lr=lr, weight_decay=0.01, kahan_sum=True, foreach=True
        )
    except ImportError:
        print("torch-optimi is not installed: pip install --no-deps torch-optimi", flush=True)
    rows["torch AdamW fused (nearest)"] = lambda: torch.optim.AdamW(
        params, lr=lr, weight_decay=0.01, fused=True
    )
    groups = param_groups(model)
    rows["DolphinFlow vector, defaults (kahan)"] = lambda: shardflow.DolphinFlow(groups, lr=lr)
    rows["DolphinFlow vector, precision=sr"] = lambda: shardflow.DolphinFlow(
        groups, lr=lr, precision="sr"
    )
    rows["FactoredAdam, defaults (kahan)"] = lambda: shardflow.FactoredAdam(params, lr=lr)
    rows["FactoredAdam, precision=sr"] = lambda: shardflow.FactoredAdam(
        params, lr=lr, precision="sr"
    )
    return rows


def step_bench(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    shapes = SMOLLM2_135M.with_layers(args.layers)
    model = build_model(shapes, device="cpu", dtype=torch.bfloat16)
    grads = random_grads(model)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    n = sum(p.numel() for p in model.parameters())
    builders = _step_rows(model, 1e-4)
    optimizers = {name: build() for name, build in builders.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for round_ in range(args.warmup + args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            optimizers[name].step()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    anchor = next(iter(times))
    base = statistics.median(times[anchor])
    lines = [
        f"# bf16 weights: step time against optimi's Kahan AdamW ({datetime.date.today()})",
        "",
        f"Command: `python -m bench.precision step --threads {args.threads} --layers "
        f"{args.layers} --rounds {args.rounds}`",
        f"Machine: {_machine()}; torch {torch.__version__}, {args.threads} thread(s).",
        f"Parameters: SmolLM2-135M shapes with {args.layers} layers, {n / 1e6:.1f} M, bf16; "
        "fixed random gradients; median of the timed rounds, optimizers stepped round-robin.",
        "",
        "| optimizer | median step (ms) | ratio to the anchor | state B/param |",
        "|---|---|---|---|",
    ]
    for name, opt in optimizers.items():
        med = statistics.median(times[name])
        per_param = _state_bytes(opt) / n
        lines.append(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x | {per_param:.2f} |")
    return "\n".join(lines) + "\n"


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.numel() > 1
    )


# -- convergence ------------------------------------------------------------------------------


def _compare(args: argparse.Namespace, out: Path, dtype: str, precision: str | None) -> list:
    overrides = [
        "--optimizers", args.optimizers,
        "--lrs", args.lr,
        "--train.steps", str(args.steps),
        "--run.out_dir", str(out),
        "--run.nproc", "1",
        "--placement.kind", "none",
        "--checkpoint.every", "0",
        "--checkpoint.save_model", "false",
        "--log.progress", "false",
        "--log.plot", "false",
        "--model.dtype", dtype,
    ]  # fmt: skip
    if precision is not None:
        overrides += ["--optim.hyper.precision", precision]
    command = [sys.executable, str(ROOT / "launch" / "compare.py"), args.config, *overrides]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads((out / "compare.json").read_text())


def convergence_bench(args: argparse.Namespace) -> str:
    settings = [("fp32", "float32", None)] + [
        (f"bf16 {p}", "bfloat16", p) for p in args.precisions.split(",")
    ]
    loss: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype, precision in settings:
            out = Path(tmp) / label.replace(" ", "-")
            for s in _compare(args, out, dtype, precision):
                loss.setdefault(s["optimizer"], {})[label] = s["final_val_loss"]
    labels = [label for label, _, _ in settings]
    lines = [
        f"# bf16 weights: convergence per precision ({datetime.date.today()})",
        "",
        f"Command: `python -m bench.precision convergence --optimizers {args.optimizers} "
        f"--lr {args.lr} --steps {args.steps} --precisions {args.precisions}`",
        f"Machine: {_machine()}; torch {torch.__version__}.",
        f"Model and data: {Path(args.config).name} in one process (byte tokens, the Python "
        "standard library); the config's warm-up + cosine schedule; the same data and seed "
        "for every run. Final validation loss (nats/token); in brackets the gap to the fp32 run "
        "of the same optimizer.",
        "",
        "| optimizer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, row in loss.items():
        ref = row["fp32"]
        cells = [f"{ref:.4f}"] + [
            f"{row[label]:.4f} ({(row[label] - ref) / ref:+.1%})" for label in labels[1:]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step")
    step.add_argument("--threads", type=int, default=1)
    step.add_argument("--layers", type=int, default=4)
    step.add_argument("--warmup", type=int, default=2)
    step.add_argument("--rounds", type=int, default=7)
    conv = sub.add_parser("convergence")
    conv.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    conv.add_argument("--optimizers", default=CONVERGENCE_OPTIMIZERS)
    conv.add_argument("--lr", default="3e-3")
    conv.add_argument("--steps", type=int, default=200)
    conv.add_argument("--precisions", default=",".join(PRECISIONS))
    for p in (step, conv):
        p.add_argument("--tag", default="cpu2", help="hardware tag in the results file name")
    args = parser.parse_args()
    text = step_bench(args) if args.what == "step" else convergence_bench(args)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"precision-{args.what}-{args.tag}-{datetime.date.today().isoformat()}"
    (RESULTS / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
