"""Metrics JSONL, the rank-0 progress bar and loss-curve plots (matplotlib, the plot extra)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

FAIL_ENV = "SHARDFLOW_TEST_FAIL_METRICS_AT_STEP"
"""Test hook: writing the metrics row of this step raises ``OSError(ENOSPC)`` (a full disk).
Only rank 0 writes metrics, so the failure is rank-local, after the process group started."""


def source_commit() -> str | None:
    """The git commit of the ShardFlow source that runs (``+dirty`` when its tracked files
    differ from it); None outside a git checkout (an installed wheel) or without git."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if dirty else commit


class MetricsLog:
    """Append-only JSONL of metric rows; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path, warn=False) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        with open(self.path, "w") as fh:
            for row in kept:
                fh.write(json.dumps(row) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (rank 0 only; other ranks ignore the call)."""
        if not self.enabled:
            return
        if row.get("step") == int(os.environ.get(FAIL_ENV, "-1")):
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAIL_ENV})")
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


class MetricsError(ValueError):
    """A metrics JSONL file that cannot be read (a bad line before the last one)."""


def read_metrics(path: str | Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file ([] when it does not exist).

    A last line that is not JSON (a write cut short by a crash or a full disk) is dropped, with a
    warning when ``warn``; a bad line before it is a :class:`MetricsError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (line_no, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise MetricsError(
                    f"{path}:{line_no} is not JSON ({exc.msg}); fix or delete that line."
                ) from exc
            if warn:
                warnings.warn(
                    f"{path}:{line_no}: the last line is cut short ({line[:40]!r}...); dropped.",
                    UserWarning,
                    stacklevel=2,
                )
            break
        rows.append(row)
    return rows


class Progress:
    """Rank 0's console: a tqdm bar with loss, lr and tokens/s, and notes between its lines.

    Plain lines replace the bar when tqdm is missing or ``bar`` is False; other ranks print
    nothing.
    """

    def __init__(
        self, *, total: int, start: int, main: bool, bar: bool, desc: str, header: str = ""
    ) -> None:
        self.main = main
        self.total = total
        self.bar = None
        if header:
            self.note(header)
        if not (main and bar):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Advance to ``step`` and show the latest numbers."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
            )
            self.bar.update(step - self.bar.n)
        elif self.main and (step % max(1, self.total // 10) == 0 or step == self.total):
            self.note(
                f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} tok/s {tokens_per_s:,.0f}"
            )

    def note(self, text: str) -> None:
        """Print a line (rank 0) without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.main:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (no lag toward the first value)."""
    out, avg = [], 0.0
    for t, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**t))
    return out


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path | None:
    """Train (smoothed) and validation loss against step for each run, one figure.

    Returns the PNG path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        if train:
            steps = [r["step"] for r in train]
            losses = [r["loss"] for r in train]
            ax_train.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax_train.plot(steps, _smooth(losses, 0.9), color=color, label=label, linewidth=1.6)
        if val:
            ax_val.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o-",
                color=color,
                label=label,
                markersize=3,
            )
    ax_train.set(
        title="training loss (smoothed; faint: raw)",
        xlabel="step",
        ylabel="cross-entropy (nats/token)",
    )
    ax_val.set(title="validation loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
