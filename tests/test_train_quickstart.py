"""The embedded quickstart, exactly as shipped: 2 ranks, FSDP2 on CPU (gloo), the standard-library
corpus. Slow (about 2 minutes on 2 idle cores) but part of the default test run.

Stated result: the validation loss falls by at least 2.5 nats from step 0 (5.32, near the
uniform ln 257 = 5.55) to step 120. Measured: see MIN_VAL_LOSS_DROP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardflow.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.toml"

MIN_VAL_LOSS_DROP = 2.5
"""Nats. Measured as shipped (DolphinFlow, 2 FSDP2 ranks, 120 steps, warm-up 30, seed 0,
2026-11-23): 5.320 -> 2.376 (drop 2.94). With warm-up 15: 5.320 -> 2.716 (2.60, after a one-step
spike); AdamW at lr 3e-3 on 2 FSDP2 ranks, warm-up 15: 5.320 -> 2.679 (2.64). 2.5 leaves room
for other CPUs' float differences without passing a run that learned markedly less."""


def test_quickstart_loss_falls(tmp_path):
    out = tmp_path / "quickstart"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "launch" / "train.py"),
        str(CONFIG),
        "--run.out_dir",
        str(out),
        "--log.progress",
        "false",
    ]
    began = time.perf_counter()
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.perf_counter() - began
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    print(f"quickstart: wall {wall:.0f}s, val loss {vals[0]:.3f} -> {vals[-1]:.3f}")
    assert vals[0] - vals[-1] >= MIN_VAL_LOSS_DROP
    assert (out / "loss.png").is_file() and (out / "final" / "model.safetensors").is_file()
