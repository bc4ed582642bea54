"""Checkpoint save/load throughput and peak extra memory: ShardFlow vs torch.save and DCP.

Run from the repository root::

    /work/venv/bin/python -m bench.checkpoint                    # ~25M params, ~2 min on 2 cores
    /work/venv/bin/python -m bench.checkpoint --hidden 1024 --layers 4 --repeats 2

What it measures, on the same state — a stack of ``Linear(hidden, hidden)`` layers and a
DolphinFlow optimizer after one step (fp32 weights + ``exp_avg`` + ``exp_avg_sq`` + scalars,
≈12 B/param) — one process, CPU, each method in its own fresh subprocess so memory peaks do not
leak between them:

- ``shardflow``: ``shardflow.checkpoint.save`` / ``load`` (safetensors per rank + index, SHA-256
  while writing, fsync of every file and directory, verification by SHA-256 before loading);
- ``torch``: ``torch.save({"model": sd, "optim": opt.state_dict()})`` (zip + pickle, no fsync)
  / ``torch.load(weights_only=True)`` + ``load_state_dict``;
- ``torch+fsync``: the same, then ``fsync`` of the file and its directory — what a checkpoint
  that survives a crash costs (ShardFlow and DCP both fsync);
- ``dcp``: ``torch.distributed.checkpoint.save`` of ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` (fsyncs its files) / ``dcp.load`` + ``set_*_state_dict``.

and the model weights alone (``weights:`` rows, save only), the export other tools read:

- ``weights:shardflow``: ``shardflow.checkpoint.save_model_weights`` (streams one tensor at a
  time, fsyncs);
- ``weights:safetensors``: ``safetensors.torch.save_file(model.state_dict())`` (no fsync).

Throughput = state bytes / wall seconds (median of ``--repeats``); loads read a warm page cache
(the files were just written; dropping the cache needs root and would disturb other users).
Peak extra memory = the process's peak RSS during the call minus its RSS just before
(``/proc/self/clear_refs`` resets the peak). Ratios are against ShardFlow, measured in one run.
Results go to ``bench/results/checkpoint-<machine>-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("shardflow", "torch", "torch+fsync", "dcp")
WEIGHT_METHODS = ("weights:shardflow", "weights:safetensors")


def _memory_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss, peak


def _measure(fn) -> tuple[float, float]:
    """(seconds, peak extra MiB) of ``fn()``."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = _memory_kib()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _, peak = _memory_kib()
    return seconds, max(0, peak - before) / 1024


def _state(hidden: int, layers: int):
    from shardflow import DolphinFlow  # noqa: PLC0415

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    opt = DolphinFlow(model.parameters(), lr=1e-3, ortho_mode=None)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return model, opt, nbytes


def _methods(model, opt, where: Path):
    if (method := _METHOD) == "shardflow":
        import shardflow.checkpoint as ck  # noqa: PLC0415

        def save():
            ck.save(where, model=model, optimizer=opt)

        def load():
            ck.load(where, model=model, optimizer=opt)

    elif method in ("torch", "torch+fsync"):
        file = where.with_suffix(".pt")

        def save():
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, file)
            if method == "torch+fsync":
                from shardflow.checkpoint._format import fsync_dir  # noqa: PLC0415

                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(file.parent)

        def load():
            state = torch.load(file, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])

    elif method.startswith("weights:"):
        file = where.with_suffix(".safetensors")

        def save():
            if method == "weights:shardflow":
                import shardflow.checkpoint as ck  # noqa: PLC0415

                ck.save_model_weights(file, model)
            else:
                from safetensors.torch import save_file  # noqa: PLC0415

                save_file(model.state_dict(), str(file))

        load = None
    else:
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        def save():
            state = {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt),
            }
            dcp.save(state, checkpoint_id=where)

        def load():
            state = {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt),
            }
            dcp.load(state, checkpoint_id=where)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])

    return save, load


_METHOD = "shardflow"


def worker(method: str, hidden: int, layers: int, repeats: int) -> dict:
    """Run one method in this (fresh) process; print its figures as JSON."""
    global _METHOD
    _METHOD = method
    torch.set_num_threads(1)
    model, opt, nbytes = _state(hidden, layers)
    saves, loads = [], []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the disk, not a tmpfs
        for i in range(repeats):
            where = Path(tmp) / f"run{i}"
            save, load = _methods(model, opt, where)
            saves.append(_measure(save))
            if load is not None:
                loads.append(_measure(load))
            shutil.rmtree(where, ignore_errors=True)
            where.with_suffix(".pt").unlink(missing_ok=True)
            where.with_suffix(".safetensors").unlink(missing_ok=True)
    if method.startswith("weights:"):
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "method": method,
        "bytes": nbytes,
        "save_s": statistics.median(s for s, _ in saves),
        "save_extra_mib": max(m for _, m in saves),
        "load_s": statistics.median(s for s, _ in loads) if loads else None,
        "load_extra_mib": max(m for _, m in loads) if loads else None,
    }


def _machine() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        return ["lscpu unavailable"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=METHODS + WEIGHT_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.hidden, args.layers, args.repeats)))
        return
    rows = []
    for method in METHODS + WEIGHT_METHODS:
        cmd = [sys.executable, "-m", "bench.checkpoint", "--worker", method]
        cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers)]
        cmd += ["--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", file=sys.stderr)
    base, wbase = rows[0], rows[len(METHODS)]
    gb = base["bytes"] / 1e9
    params = args.hidden * (args.hidden + 1) * args.layers
    lines = [
        f"# Checkpoint save/load — {datetime.date.today()}",
        "",
        "Command: `/work/venv/bin/python -m bench.checkpoint "
        f"--hidden {args.hidden} --layers {args.layers} --repeats {args.repeats}`",
        "",
        f"State: {params / 1e6:.1f}M params, DolphinFlow (fp32 weights + 2 fp32 moments + "
        f"scalars) = {gb:.3f} GB; one process, CPU, median of {args.repeats}; loads from a warm "
        "page cache. Peak extra = peak RSS during the call minus RSS before it. "
        f"Load average at the start: {os.getloadavg()[0]:.1f} (2 cores, shared).",
        "",
        "| method | save GB/s | load GB/s | save peak extra MiB | load peak extra MiB |"
        " save time vs shardflow | load time vs shardflow |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = wbase if r["method"].startswith("weights:") else base
        rgb = r["bytes"] / 1e9
        load = "—" if r["load_s"] is None else f"{rgb / r['load_s']:.2f}"
        load_mib = "—" if r["load_extra_mib"] is None else f"{r['load_extra_mib']:.0f}"
        load_x = "—" if r["load_s"] is None else f"{r['load_s'] / ref['load_s']:.2f}x"
        lines.append(
            f"| {r['method']} | {rgb / r['save_s']:.2f} | {load} | "
            f"{r['save_extra_mib']:.0f} | {load_mib} | "
            f"{r['save_s'] / ref['save_s']:.2f}x | {load_x} |"
        )
    wgb = wbase["bytes"] / 1e9
    lines += [
        "",
        f"`weights:` rows: the model's weights alone ({wgb:.3f} GB), ratios against "
        "`weights:shardflow`.",
    ]
    lines += ["", "Machine (`lscpu | head`):", "", "```", *_machine(), "```", ""]
    text = "\n".join(lines)
    print(text)
    out = args.out or Path("bench/results") / f"checkpoint-cpu2-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
