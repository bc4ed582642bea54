"""Low-precision weights: step time against optimi's Kahan AdamW, and convergence per precision.

Run from the repository root::

    python -m bench.precision step                   # bf16 step time, 1 thread, ~2 min
    python -m bench.precision step --threads 2 --layers 2
    python -m bench.precision step --layers 2 --rounds 1 --profile   # + where DolphinFlow's step goes
    python -m bench.precision convergence            # 3 optimizers x 4 weight dtypes, ~30 min
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

**convergence** — the quickstart model and corpus (``configs/quickstart.toml``) for ``--steps``
steps in one process, each optimizer at one learning rate, with weights stored in fp32 and in
bf16 under each ``precision``; the forward and backward run in fp32 on a copy of the weights (no
fast bf16 matmul on a CPU: bf16 compute was 4x slower here, and what is measured is how updates
reach stored weights). The final validation loss per run, and the gap of each bf16 run to the fp32
run of the same optimizer.

Results go to ``bench/results/precision-{step,convergence}-<tag>-<date>.md`` with the command,
machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
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
CONVERGENCE_OPTIMIZERS = "dolphinflow,whiteflow,factored_adam"


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
    if args.profile:
        _profile(optimizers["DolphinFlow vector, defaults (kahan)"])
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


def _profile(opt: torch.optim.Optimizer) -> None:
    """Where one step of ``opt`` spends its time (cProfile, the 12 largest own times)."""
    import cProfile  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    profiler = cProfile.Profile()
    profiler.runcall(opt.step)
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.numel() > 1
    )


# -- convergence ------------------------------------------------------------------------------


def _run(args: argparse.Namespace, name: str, dtype: torch.dtype, precision: str | None) -> float:
    """Train the quickstart model with ``name`` on weights stored in ``dtype``; return the final
    validation loss. The forward and backward run in fp32 on a copy of the weights (a CPU has no
    fast bf16 matmul; what is measured is how the optimizer's updates reach stored weights)."""
    from shardflow.optim.registry import build_optimizer  # noqa: PLC0415
    from shardflow.train.config import load_config  # noqa: PLC0415
    from shardflow.train.data import ByteTokenizer, load_corpus, sample_batch  # noqa: PLC0415
    from shardflow.train.loop import lr_factor  # noqa: PLC0415
    from shardflow.train.model import build_decoder  # noqa: PLC0415

    cfg = load_config(args.config)
    cfg.run.seed = args.seed
    torch.manual_seed(cfg.run.seed)
    compute = build_decoder(cfg.model)
    compute.reset_parameters(cfg.run.seed)
    stored = [torch.nn.Parameter(p.detach().to(dtype)) for p in compute.parameters()]
    by_compute = dict(zip(compute.parameters(), stored))
    groups = [{**g, "params": [by_compute[p] for p in g["params"]]} for g in param_groups(compute)]
    extra = {} if precision is None else {"precision": precision}
    opt = build_optimizer(name, groups, lr=args.lr, weight_decay=0.0, **extra)
    corpus = load_corpus(cfg.data, ByteTokenizer())
    seq, batch = cfg.data.seq_len, cfg.train.micro_batch
    warmup, min_ratio = cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio
    lrs = [g["lr"] for g in opt.param_groups]
    for step in range(args.steps):
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr * lr_factor(step, args.steps, warmup, min_ratio)
        with torch.no_grad():
            for c, s in zip(compute.parameters(), stored):
                c.copy_(s)
        x, y = sample_batch(corpus.train, seq, batch, "train", cfg.run.seed, step)
        logits = compute(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        compute.zero_grad(set_to_none=True)
        loss.backward()
        for c, s in zip(compute.parameters(), stored):
            s.grad = c.grad.to(dtype)
        opt.step()
    with torch.no_grad():
        for c, s in zip(compute.parameters(), stored):
            c.copy_(s)
        val = []
        for i in range(args.eval_batches):
            x, y = sample_batch(corpus.val, seq, batch, "val", i)
            logits = compute(x)
            val.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    return float(torch.stack(val).mean())


def convergence_bench(args: argparse.Namespace) -> str:
    settings = [("fp32", torch.float32, None)] + [
        (f"bf16 {p}", torch.bfloat16, p) for p in args.precisions.split(",")
    ]
    labels = [label for label, _, _ in settings]
    lines = [
        f"# bf16 weights: convergence per precision ({datetime.date.today()})",
        "",
        f"Command: `python -m bench.precision convergence --optimizers {args.optimizers} "
        f"--lr {args.lr} --steps {args.steps} --precisions {args.precisions} --seed {args.seed}`",
        f"Machine: {_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        f"Model and data: {Path(args.config).name}'s model and corpus in one process (byte "
        "tokens, the Python standard library), its warm-up + cosine schedule, the same batches "
        "for every run; weights stored in the dtype named, forward and backward in fp32 on a "
        "copy (what changes is only how updates reach the stored weights). Final validation "
        f"loss (nats/token, {args.eval_batches} batches); in brackets the gap to the fp32 run of "
        "the same optimizer.",
        "",
        "| optimizer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name in args.optimizers.split(","):
        row = {}
        for label, dtype, precision in settings:
            started = time.perf_counter()
            row[label] = _run(args, name, dtype, precision)
            print(
                f"{name} {label}: {row[label]:.4f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        ref = row["fp32"]
        cells = [f"{ref:.4f}"] + [
            f"{row[label]:.4f} ({(row[label] - ref) / ref:+.2%})" for label in labels[1:]
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
    step.add_argument("--profile", action="store_true", help="cProfile one DolphinFlow step")
    conv = sub.add_parser("convergence")
    conv.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    conv.add_argument("--optimizers", default=CONVERGENCE_OPTIMIZERS)
    conv.add_argument("--lr", type=float, default=3e-3)
    conv.add_argument("--eval-batches", type=int, default=8)
    conv.add_argument("--seed", type=int, default=0, help="weights' init and batch order")
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
