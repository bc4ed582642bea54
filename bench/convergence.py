# Convergence benchmark: AdamW against each ShardFlow optimizer on the embedded corpus (the
# running Python's standard library, byte tokens), the quickstart model, every optimizer tuned
# over the same learning-rate grid; one plot, one table.
#
# How to run (repository root):
#   python bench/convergence.py                           # 1 process, registered optimizers
#   python bench/convergence.py --nproc 2                 # 2 ranks, FSDP2 (gloo)
#   python bench/convergence.py --optimizers adamw,dolphinflow --lrs 1e-3,3e-3,1e-2 --steps 120
#   python bench/convergence.py --train.micro_batch 8     # any config override is passed on
#   python bench/convergence.py --optimizers adamw,factored_adam --optim.hyper.factored false
#       # optimizer arguments: --optim.hyper.KEY VALUE goes to every optimizer in the list whose
#       # constructor takes KEY (the others run without it); a KEY none takes is an error
#   python bench/convergence.py --optimizers adamw,whiteflow --label whiteflow-small \
#       --model.dim 128 --model.n_layers 4                # model-size overrides; --label names
#       # the results files (default: the optimizer names), so concurrent runs never collide
# How long: (optimizers x lrs) quickstart-sized runs, about 1-2 minutes each on 2 CPU cores.
# Needs: torch; matplotlib for the plot.
# Writes bench/results/convergence-<label>-<tag>-<date>.{md,png,json}.
"""Compare optimizers on the embedded corpus with launch/compare.py and keep the results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _arguments() -> argparse.Namespace:
    """Command-line options; unknown ones are config overrides for every run."""
    from shardflow.train.optimizers import known_optimizers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    parser.add_argument("--optimizers", default=",".join(known_optimizers()))
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--nproc", type=int, default=1, help="1: one process; >1: FSDP2 ranks")
    parser.add_argument("--tag", default="cpu2", help="hardware tag in the results file names")
    parser.add_argument(
        "--label", default="", help="results file name part (default: the optimizer names)"
    )
    args, extra = parser.parse_known_args()
    args.extra = extra  # passed on to compare.py as config overrides (--section.field VALUE)
    return args


def _command(args: argparse.Namespace, out: Path) -> list[str]:
    compare = str(ROOT / "launch" / "compare.py")
    overrides = [
        "--optimizers",
        args.optimizers,
        "--lrs",
        args.lrs,
        "--train.steps",
        str(args.steps),
        "--run.out_dir",
        str(out),
        "--run.nproc",
        str(args.nproc),
        "--checkpoint.every",
        "0",
        "--checkpoint.save_model",
        "false",
        "--log.progress",
        "false",
        *args.extra,
    ]
    if args.nproc == 1:
        return [sys.executable, compare, args.config, *overrides, "--placement.kind", "none"]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
    ]
    return [*launcher, compare, args.config, *overrides, "--placement.kind", "fsdp"]


def _best_per_optimizer(summaries: list[dict]) -> list[str]:
    best: dict[str, dict] = {}
    for s in summaries:
        if (
            s["optimizer"] not in best
            or s["final_val_loss"] < best[s["optimizer"]]["final_val_loss"]
        ):
            best[s["optimizer"]] = s
    lines = [
        "| optimizer | best lr | final val loss | final train loss (last 10) |",
        "|---|---|---|---|",
    ]
    for name, s in sorted(best.items(), key=lambda kv: kv[1]["final_val_loss"]):
        lines.append(
            f"| {name} | {s['lr']:g} | {s['final_val_loss']:.4f} | {s['final_loss']:.4f} |"
        )
    return lines


def _machine() -> str:
    """``lscpu`` model line and core count, else what ``platform`` knows."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        rows = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        model = rows.get("Model name", platform.processor()).strip()
        return f"{model}, {rows.get('CPU(s)', '?').strip()} CPU(s)"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} CPU(s)"


def main() -> int:
    args = _arguments()
    from shardflow.train.cli import summary_table

    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    label = args.label or "-".join(names)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "convergence"
        command = _command(args, out)
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        summaries = json.loads((out / "compare.json").read_text())
        stem = f"convergence-{label}-{args.tag}-{datetime.date.today().isoformat()}"
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        plotted = (out / "compare.png").exists()  # not without matplotlib (the plot extra)
        if plotted:
            shutil.copy(out / "compare.png", results / f"{stem}.png")
    (results / f"{stem}.json").write_text(json.dumps(summaries, indent=2))
    text = [
        f"# Convergence on the embedded corpus ({datetime.date.today().isoformat()})",
        "",
        f"Command: `python bench/convergence.py --optimizers {args.optimizers} --lrs {args.lrs} "
        f"--steps {args.steps} --nproc {args.nproc} --tag {args.tag} "
        f"{'--label ' + args.label + ' ' if args.label else ''}{' '.join(args.extra)}`",
        f"Machine: {_machine()}, Python {platform.python_version()}; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-minute; the machine is "
        "shared, so times are indicative only).",
        f"Model and data: {Path(args.config).name} (byte tokens, Python standard library, "
        "split by file); warm-up + cosine schedule as in the config; schedule and data are the "
        "same for every run, only the optimizer and its peak lr change.",
        "",
        "Best learning rate per optimizer (by final validation loss):",
        "",
        *_best_per_optimizer(summaries),
        "",
        "Every run:",
        "",
        summary_table(summaries),
        "",
        f"![loss curves]({stem}.png)" if plotted else "(no plot: matplotlib is not installed)",
        "",
    ]
    (results / f"{stem}.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
