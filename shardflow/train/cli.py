"""Command lines behind launch/train.py and launch/compare.py.

Exit codes: 0 done, 2 bad input (config, data, model, launch). Bad input is reported once, by
rank 0, before any process group starts, and every rank exits with the same code.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shardflow.train.config import Config, ConfigError, load_config
from shardflow.train.loop import preflight, train
from shardflow.train.metrics import plot_losses, read_metrics
from shardflow.train.optimizers import (
    accepts_option,
    check_optimizer_name,
)
from shardflow.train.placement import ProcessInfo, init_distributed, process_info

BAD_INPUT = 2


def _fail(proc: ProcessInfo, exc: Exception) -> int:
    if proc.is_main:
        print(f"shardflow: error: {exc}", file=sys.stderr, flush=True)
    return BAD_INPUT


def _parser(prog: str, compare: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train from a TOML run config; --section.field VALUE overrides any field.",
    )
    parser.add_argument("config", help="a configs/*.toml run config")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (groups, owners, memory per rank) and exit",
    )
    if compare:
        parser.add_argument(
            "--optimizers",
            required=True,
            help="comma-separated optimizer names, run in turn; --optim.hyper.KEY VALUE goes to "
            "those whose constructor takes KEY",
        )
        parser.add_argument(
            "--lrs", default="", help="comma-separated peak learning rates tried for each optimizer"
        )
    return parser


def _finish_group() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_train(argv: list[str]) -> int:
    """``launch/train.py CONFIG [--dry-run] [--section.field VALUE ...]``."""
    args, overrides = _parser("train", compare=False).parse_known_args(argv)
    proc = process_info()
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from shardflow.train.plan import dry_run

            if proc.is_main:
                print(dry_run(cfg), flush=True)
            return 0
        prep = preflight(cfg, proc)
    except ConfigError as exc:
        return _fail(proc, exc)
    init_distributed(cfg, prep.device, proc)
    try:
        summary = train(cfg, prep, proc)
    finally:
        _finish_group()
    if proc.is_main:
        print(summary_text(cfg, summary), flush=True)
    return 0


def summary_text(cfg: Config, summary: dict[str, Any]) -> str:
    """What a finished run prints: losses, time, and where its files are."""
    out = cfg.output_dir()

    def loss(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"done: {summary['name']}, {summary['steps']} steps of {summary['optimizer']} "
        f"in {summary['elapsed_s']:.1f} s",
        f"  validation loss  {loss('first_val_loss')} -> {loss('final_val_loss')} nats/token",
        f"  training loss    {loss('first_loss')} -> {loss('final_loss')} (mean of the last 10)",
    ]
    files = [
        ("loss curve", summary.get("plot")),
        ("metrics", out / "metrics.jsonl"),
        ("summary", out / "summary.json"),
        ("model", out / "final" / "model.safetensors" if cfg.checkpoint.save_model else None),
        ("checkpoints", out / "checkpoints" if cfg.checkpoint.every else None),
    ]
    lines += [f"  {label + ':':<13}{path}" for label, path in files if path]
    return "\n".join(lines)


def hyper_for(name: str, hyper: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The ``[optim.hyper]`` keys optimizer ``name`` takes; a key that none of ``names`` takes
    is an error (a misspelling), a key only some take goes to those."""
    for key in hyper:
        if not any(accepts_option(n, key) for n in names):
            raise ConfigError(
                f"optim.hyper.{key} is an argument of none of {names}; check its spelling "
                "against the optimizers' constructors."
            )
    return {k: v for k, v in hyper.items() if accepts_option(name, k)}


def _variants(cfg: Config, names: list[str], lrs: list[float]) -> list[Config]:
    base = cfg.output_dir()
    out = []
    for name in names:
        for lr in lrs or [cfg.optim.lr]:
            variant = copy.deepcopy(cfg)
            label = name if not lrs else f"{name}-lr{lr:g}"
            variant.optim.name, variant.optim.lr = name, lr
            variant.optim.hyper = hyper_for(name, cfg.optim.hyper, names)
            variant.run.name, variant.run.out_dir = label, str(base / label)
            out.append(variant)
    return out


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of compare results, best final validation loss first."""
    rows = sorted(summaries, key=lambda s: s.get("final_val_loss") or float("inf"))
    lines = [
        "| run | optimizer | lr | first loss | final train loss (last 10) | final val loss | "
        "time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(
            f"| {s['name']} | {s['optimizer']} | {s['lr']:g} | {s['first_loss']:.4f} | "
            f"{s['final_loss']:.4f} | {s['final_val_loss'] or float('nan'):.4f} | "
            f"{s['elapsed_s']:.1f} |"
        )
    return "\n".join(lines)


def main_compare(argv: list[str]) -> int:
    """``launch/compare.py CONFIG --optimizers a,b [--lrs x,y] [--section.field VALUE ...]``."""
    args, overrides = _parser("compare", compare=True).parse_known_args(argv)
    proc = process_info()
    try:
        cfg = load_config(args.config, overrides)
        names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
        for name in names:
            check_optimizer_name(name)
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()] if args.lrs else []
        variants = _variants(cfg, names, lrs)
        for variant in variants:
            variant.log.plot = False
        prep = preflight(variants[0], proc)
    except ConfigError as exc:
        return _fail(proc, exc)
    except ValueError as exc:
        return _fail(proc, ConfigError(f"--lrs={args.lrs!r} must be numbers: {exc}"))
    init_distributed(cfg, prep.device, proc)
    summaries = []
    try:
        for variant in variants:
            summaries.append(train(variant, prep, proc))
    finally:
        _finish_group()
    if proc.is_main:
        write_comparison(cfg, variants, summaries)
    return 0


def write_comparison(cfg: Config, variants: list[Config], summaries: list[dict]) -> Path:
    """compare.png (every run on one plot), compare.md and compare.json in the base folder."""
    base = cfg.output_dir()
    runs = {v.run.name: read_metrics(v.output_dir() / "metrics.jsonl") for v in variants}
    plot_losses(runs, base / "compare.png", f"{cfg.run.name}: optimizers compared")
    (base / "compare.json").write_text(json.dumps(summaries, indent=2))
    (base / "compare.md").write_text(summary_table(summaries) + "\n")
    print(summary_table(summaries), flush=True)
    return base
