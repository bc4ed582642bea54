"""Factored optimizers: state bytes/param, step time against torch AdamW, small convergence run.

Run (CPU, ~10 min on a 2-core machine; each part can run alone):

    /work/venv/bin/python bench/factored.py memory
    /work/venv/bin/python bench/factored.py speed [--rounds 7] [--threads 1] [--cases ...]
    /work/venv/bin/python bench/factored.py convergence [--steps 1000] [--reuse]

- ``memory``: state bytes/param on SmolLM2-135M shapes (hidden 576, MLP 1536, 9 heads, 3 kv heads
  of dim 64, vocab 49152 tied, 30 layers; shapes only, built on the ``meta`` device) and on one
  768×1024 matrix, against adv_optm 2.5.16's ≈0.14 (ANCHORS.md) and AdamW's 8.
- ``speed``: optimizer step time on one SmolLM2 decoder layer's weights (3.5 M params), a
  768×1024 matrix and all of SmolLM2-135M's weights: torch AdamW fused, alone and after
  ``clip_grad_norm_`` (the anchors), and FactoredAdam eager (the torch path), ``compiled=True``
  and with the native CPU kernel (the default where it builds), measured interleaved round by
  round in one process; medians and ratios printed (``--skip`` leaves contenders out).
- ``convergence``: the runtime's convergence benchmark (launch/compare.py, as bench/convergence.py
  runs it) on configs/quickstart.toml shrunk to 0.40 M params, FactoredAdam ``factored=True``
  vs ``factored=False`` over an lr grid, 1000 steps; the best validation losses, their ratio
  (target: within 2 %) and a plot (``factored-convergence-cpu-<date>.png``). ~12 min.

Results are appended to ``bench/results/factored-cpu-<date>.md`` with the command and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardflow.optim.factored import FactoredAdam, FactoredAdopt, FactoredProdigy  # noqa: E402
from shardflow.optim.memory import estimate_state_footprint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def smollm2_135m_shapes() -> dict[str, tuple[int, ...]]:
    """Weight shapes of SmolLM2-135M (Llama architecture, tied embeddings), (out, in) order."""
    hidden, mlp, heads, kv_heads, head_dim, vocab, layers = 576, 1536, 9, 3, 64, 49152, 30
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (vocab, hidden)}
    for i in range(layers):
        shapes.update(_layer_shapes(i, hidden, mlp, heads * head_dim, kv_heads * head_dim))
    shapes["norm"] = (hidden,)
    return shapes


def _layer_shapes(i, hidden, mlp, q_out, kv_out):
    p = f"layers.{i}."
    return {
        p + "q_proj": (q_out, hidden),
        p + "k_proj": (kv_out, hidden),
        p + "v_proj": (kv_out, hidden),
        p + "o_proj": (hidden, q_out),
        p + "gate_proj": (mlp, hidden),
        p + "up_proj": (mlp, hidden),
        p + "down_proj": (hidden, mlp),
        p + "input_layernorm": (hidden,),
        p + "post_attention_layernorm": (hidden,),
    }


def memory() -> list[str]:
    model = smollm2_135m_shapes()
    matrix = {"w": (768, 1024)}
    n_params = sum(math.prod(s) for s in model.values())
    configs = [
        ("torch AdamW", torch.optim.AdamW, {}),
        ("FactoredAdam", FactoredAdam, {}),
        ("FactoredAdam grams", FactoredAdam, {"grams": True}),
        ("FactoredAdam ademamix", FactoredAdam, {"ademamix": True}),
        ("FactoredAdopt", FactoredAdopt, {}),
        ("FactoredProdigy slice_p=11", FactoredProdigy, {}),
        ("FactoredProdigy slice_p=64", FactoredProdigy, {"slice_p": 64}),
        ("FactoredAdam factored=False", FactoredAdam, {"factored": False}),
    ]
    lines = [
        f"SmolLM2-135M shapes: {n_params:,} params; 768x1024 matrix: 786,432 params.",
        "",
        "| optimizer | SmolLM2-135M B/param | of which sign | 768x1024 B/param | vs adv_optm 0.1432 |",
        "|---|---|---|---|---|",
    ]
    for name, factory, hyper in configs:
        fm = estimate_state_footprint(factory, model, **hyper)
        fw = estimate_state_footprint(factory, matrix, **hyper)
        signs = sum(v for k, v in fm.by_key.items() if k.endswith("_sign")) / fm.param_elements
        lines.append(
            f"| {name} | {fm.bytes_per_param:.4f} | {signs:.4f} | {fw.bytes_per_param:.4f} | "
            f"{fw.bytes_per_param / 0.1432:.3f}x |"
        )
    fm = estimate_state_footprint(FactoredAdam, model)
    lines += ["", "FactoredAdam on SmolLM2-135M, by state key:", "```", fm.describe(), "```"]
    return lines


def _warm_up(opt, params, grads) -> float:
    """Two untimed steps (state, lazy init, compilation); returns their wall time in seconds."""
    for p, g in zip(params, grads):
        p.grad = g
    start = time.perf_counter()
    for _ in range(2):
        opt.step()
    return time.perf_counter() - start


def _time_steps(opt, steps):
    """Seconds per step: (CPU time of this process, all its threads; wall time). CPU time is
    what the other jobs on a shared machine disturb least."""
    start, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.process_time() - start) / steps, (time.perf_counter() - wall) / steps


class _ClippedAdamW:
    """Fused AdamW after ``clip_grad_norm_``: the anchor for an optimizer that computes the
    global gradient norm (ours always do, for the NaN/inf skip and clipping)."""

    def __init__(self, params):
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()


SPEED_CASES = {
    "SmolLM2 layer (3.5M)": lambda: _layer_shapes(0, 576, 1536, 576, 192),
    "768x1024": lambda: {"w": (768, 1024)},
    "SmolLM2-135M (all 272 tensors)": smollm2_135m_shapes,
}


class _TorchPathAdam(FactoredAdam):
    """FactoredAdam with the native kernel (:mod:`shardflow.ops.native.factored`) off: the
    torch (eager) path, as with ``SHARDFLOW_NATIVE=0``."""

    native_rule = False


CONTENDERS = {
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "AdamW fused + clip": _ClippedAdamW,
    "FactoredAdam": lambda ps: _TorchPathAdam(ps, lr=1e-4, compiled=False),
    "FactoredAdam compiled": lambda ps: FactoredAdam(ps, lr=1e-4, compiled=True),
    "FactoredAdam native": lambda ps: FactoredAdam(ps, lr=1e-4),
}
RATIOS = [  # (label, numerator, denominator)
    ("eager / fused", "FactoredAdam", "AdamW fused"),
    ("compiled / fused", "FactoredAdam compiled", "AdamW fused"),
    ("native / fused", "FactoredAdam native", "AdamW fused"),
    ("native / (fused + clip)", "FactoredAdam native", "AdamW fused + clip"),
]


def speed(rounds: int, cases: list[str], steps: int, skip: list[str]) -> list[str]:
    names = [n for n in CONTENDERS if n not in skip]
    ratios = [r for r in RATIOS if r[1] in names and r[2] in names]
    lines = [
        f"torch threads: {torch.get_num_threads()}; {rounds} interleaved rounds of {steps} steps; "
        "median ms/step, CPU time (process time, all threads) / wall time; 2 warm-up steps "
        "first, not counted (their wall time is listed below); load average before: "
        f"{os.getloadavg()[0]:.2f}",
        "",
        "| weights | " + " | ".join(names + [r[0] for r in ratios]) + " |",
        "|---|" + "---|" * (len(names) + len(ratios)),
    ]
    warm_lines = []
    for case in cases:
        shapes = SPEED_CASES[case]()
        torch.manual_seed(0)
        grads = [torch.randn(s) for s in shapes.values()]
        params = {n: [torch.nn.Parameter(torch.randn(s)) for s in shapes.values()] for n in names}
        opts = {n: CONTENDERS[n](params[n]) for n in names}
        warm = {n: _warm_up(opts[n], params[n], grads) for n in names}
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                times[n].append(_time_steps(opts[n], steps))
        cpu = {n: statistics.median(t[0] for t in times[n]) * 1e3 for n in names}
        wall = {n: statistics.median(t[1] for t in times[n]) * 1e3 for n in names}
        lines.append(
            f"| {case} | "
            + " | ".join(f"{cpu[n]:.1f} / {wall[n]:.1f}" for n in names)
            + "".join(f" | {cpu[a] / cpu[b]:.2f}x" for _, a, b in ratios)
            + " |"
        )
        warm_lines.append(f"- {case}: " + ", ".join(f"{n} {warm[n]:.2f} s" for n in names))
        del params, opts, grads
    return (
        lines
        + ["", "Ratios are of CPU time. Warm-up (2 steps; compilation included):"]
        + warm_lines
    )


# -- convergence --------------------------------------------------------------------------------

MODEL_OVERRIDES = [
    "--model.dim", "128", "--model.n_layers", "2", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_dim", "352", "--model.max_seq_len", "64",
    "--data.seq_len", "64", "--train.micro_batch", "8", "--train.eval_every", "100",
    "--train.eval_batches", "8", "--schedule.warmup_steps", "50",
]  # fmt: skip
"""The quickstart config shrunk to 0.40 M params (1000 steps in ~5 min per run on one core)."""

VARIANTS = {"factored": "{factored = true}", "dense": "{factored = false}"}


def _compare_command(out: Path, steps: int, lrs: str, hyper: str) -> list[str]:
    """launch/compare.py on configs/quickstart.toml, one process, FactoredAdam with ``hyper``."""
    return [
        sys.executable, str(ROOT / "launch" / "compare.py"), str(ROOT / "configs" / "quickstart.toml"),
        "--optimizers", "factored_adam", "--optim.name", "factored_adam", "--lrs", lrs,
        "--optim.hyper", hyper, "--train.steps", str(steps), "--run.nproc", "1",
        "--placement.kind", "none", "--checkpoint.every", "0", "--checkpoint.save_model", "false",
        "--log.progress", "false", "--run.out_dir", str(out), *MODEL_OVERRIDES,
    ]  # fmt: skip


def _val_curve(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def convergence(steps: int, lrs: str, out: Path, reuse: bool) -> list[str]:
    """FactoredAdam factored vs ``factored=False`` through the runtime (launch/compare.py), each
    over the lr grid; both variants run side by side, one thread each. Writes the plot."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for name, hyper in VARIANTS.items():
        if not (reuse and (out / name).is_dir()):
            cmd = _compare_command(out / name, steps, lrs, hyper)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"compare.py failed with exit status {proc.returncode}")
    curves = {}
    for name in VARIANTS:
        for metrics in sorted((out / name).glob("*/metrics.jsonl")):
            lr = float(metrics.parent.name.rsplit("-lr", 1)[1])
            curves[(name, lr)] = _val_curve(metrics)
    final = {k: c[-1][1] for k, c in curves.items()}
    best = {n: min((v, lr) for (m, lr), v in final.items() if m == n) for n in VARIANTS}
    ref = best["dense"][0]
    lines = [
        f"Runtime convergence: `launch/compare.py configs/quickstart.toml` with "
        f"`{' '.join(MODEL_OVERRIDES)}` (0.40 M params, 512 tokens/step, byte-level stdlib "
        f"corpus), 1 process, `factored_adam` with `--optim.hyper '{{factored = true|false}}'`, "
        f"{steps} steps, lr grid {lrs}, cosine to 0.1 after 50 warm-up steps, grad clip 1.0.",
        "",
        "| variant | lr | val loss @ step " + str(steps) + " | vs best factored=False |",
        "|---|---|---|---|",
    ]
    for (name, lr), v in sorted(final.items()):
        mark = " (best)" if best[name][1] == lr else ""
        lines.append(f"| {name}{mark} | {lr:g} | {v:.4f} | {v / ref - 1:+.2%} |")
    gap = best["factored"][0] / ref - 1
    lines += [
        "",
        f"Best factored {best['factored'][0]:.4f} (lr {best['factored'][1]:g}) vs best dense "
        f"{ref:.4f} (lr {best['dense'][1]:g}): {gap:+.2%} "
        f"({'within' if abs(gap) <= 0.02 else 'NOT within'} the 2 % target).",
    ]
    png = _plot(curves, steps)
    if png:
        lines += ["", f"![validation loss]({png.name})"]
    return lines


def _plot(curves: dict, steps: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {lr: f"C{i}" for i, lr in enumerate(sorted({lr for _, lr in curves}))}
    for (name, lr), curve in sorted(curves.items()):
        xs, ys = zip(*[(s, v) for s, v in curve if s > 0])
        style = "-" if name == "factored" else "--"
        ax.plot(xs, ys, style, color=colors[lr], marker="o", ms=3, label=f"{name} lr={lr:g}")
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", ylim=(1.8, 3.0))
    ax.set_title(f"FactoredAdam factored vs factored=False, {steps} steps, 0.40M params")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = RESULTS / f"factored-convergence-cpu-{datetime.date.today().isoformat()}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lscpu = []
    head = [ln for ln in lscpu if ln.split(":")[0] in ("Architecture", "CPU(s)", "Model name")]
    return (
        f"{platform.node()}: "
        + "; ".join(" ".join(ln.split()) for ln in head)
        + (f"; torch {torch.__version__}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["memory", "speed", "convergence"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--cases", default=",".join(SPEED_CASES), help="speed: comma-separated case names"
    )
    parser.add_argument("--skip", default="", help="speed: contenders to leave out")
    parser.add_argument("--timed-steps", type=int, default=5, help="speed: steps per round")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "factored-convergence")
    parser.add_argument("--reuse", action="store_true", help="read runs already in --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = {
        "memory": memory,
        "speed": lambda: speed(
            args.rounds, args.cases.split(","), args.timed_steps, args.skip.split(",")
        ),
    }.get(args.part, lambda: convergence(args.steps, args.lrs, args.out, args.reuse))()
    today = datetime.date.today().isoformat()
    header = [
        f"## {args.part} — {today}",
        "",
        f"Command: `/work/venv/bin/python bench/factored.py {shlex.join(sys.argv[1:])}`",
        f"Machine: {_machine()}",
        "",
    ]
    text = "\n".join(header + lines) + "\n\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"factored-cpu-{today}.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
