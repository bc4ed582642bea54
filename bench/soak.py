"""Soak: the quickstart trained while a random rank is SIGKILLed every few minutes (issue 18).

Run (CPU; the issue's soak is 30 minutes, the total wall time is about ``--minutes``):

    .venv/bin/python bench/soak.py --minutes 30            # the full soak
    .venv/bin/python bench/soak.py --minutes 3 --kill-every 45 --checkpoint-every 5   # a check

Two phases: 60% of ``--minutes`` for the first, at most the rest for the second (it reaches the
same step sooner: no restarts):

1. **Stitched run**: ``launch/train.py configs/quickstart.toml`` on 2 FSDP2 ranks (torchrun),
   a checkpoint every 20 steps, a metrics row every step. Every ``--kill-every`` seconds (with
   ±30% jitter, seed ``--seed``) one rank, chosen at random, gets SIGKILL; the script waits for
   the job to end and starts the same command again, which resumes from the newest checkpoint
   (its metrics rows after that step are dropped, so ``metrics.jsonl`` is the stitched curve).
2. **Uninterrupted run**: the same command in another folder, stopped (SIGKILL) once it has
   logged the last step the stitched run reached.

Reported: per attempt the step it resumed from, the step it reached, how long the job took to
end after the kill, and its workers' RSS (sum of both ranks, sampled every second: the first
sample after its first logged step, the peak, the last); the loss of both runs compared at
every step both logged (exactly equal is the target: resume is bitwise); RSS growth of the
stitched run's attempts. Results go to ``bench/results/soak-<date>.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import results_head  # noqa: E402
from bench.faults import CONFIG, RESULTS, TRAIN  # noqa: E402

ARGS = [
    "--train.steps", "100000", "--train.eval_every", "0",
    "--log.every", "1", "--log.progress", "false", "--log.plot", "false",
]  # fmt: skip
"""The quickstart as it is, but long enough never to finish, no evaluation and a metrics row every
step (plus ``--checkpoint.every``, 20 by default)."""


@dataclass
class Attempt:
    """One launch of the job."""

    resumed_from: int
    reached: int = 0
    killed_rank: int | None = None
    end_after_kill: float | None = None
    """Seconds from the SIGKILL to the end of the job."""
    rss: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since launch, summed RSS of the workers in bytes), from the first logged step."""
    code: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    """step -> loss this attempt logged (after the step it resumed from), read when it ended."""


def metrics(out: Path) -> dict[int, float]:
    """step -> training loss from ``out/metrics.jsonl`` (lines that parse)."""
    path = out / "metrics.jsonl"
    rows: dict[int, float] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row and "step" in row:
            rows[int(row["step"])] = float(row["loss"])
    return rows


def last_step(out: Path) -> int:
    rows = metrics(out)
    return max(rows) if rows else 0


def newest_checkpoint(out: Path) -> int:
    """The step of the newest checkpoint in ``out/checkpoints`` (0: none), where a job resumes."""
    names = [p.name for p in (out / "checkpoints").glob("step_*")]
    return max((int(n[5:]) for n in names if n[5:].isdigit()), default=0)


def logged_since(out: Path, wall: float) -> bool:
    """Whether ``out/metrics.jsonl`` was written after the wall-clock time ``wall``."""
    path = out / "metrics.jsonl"
    return path.is_file() and path.stat().st_mtime > wall


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (read from /proc: children, RANK=)."""
    found = {}
    for child in _children(launcher):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = child
    return found


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def rss(pids: list[int]) -> int:
    """Summed resident set size of ``pids`` in bytes (0 for a process that is gone)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def launch(out: Path, every: int, log) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(TRAIN), str(CONFIG), *ARGS, "--checkpoint.every", str(every), "--run.out_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stitched(
    out: Path, seconds: float, kill_every: float, rng: random.Random, every: int, log
) -> list[Attempt]:
    """Phase 1 (module docstring): launch, kill a random rank, relaunch, until ``seconds``."""
    attempts: list[Attempt] = []
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        attempt = Attempt(resumed_from=newest_checkpoint(out))
        attempts.append(attempt)
        proc = launch(out, every, log)
        started, wall = time.monotonic(), time.time()
        kill_at = started + kill_every * rng.uniform(0.7, 1.3)
        kill_at = min(kill_at, began + seconds)
        while proc.poll() is None:
            now = time.monotonic()
            pids = workers(proc.pid)
            if pids and logged_since(out, wall) and last_step(out) > attempt.resumed_from:
                attempt.rss.append((now - started, rss(list(pids.values()))))
            if now >= kill_at and attempt.killed_rank is None and len(pids) == 2:
                attempt.killed_rank = rng.randrange(2)
                os.kill(pids[attempt.killed_rank], signal.SIGKILL)
                killed = time.monotonic()
                proc.wait()
                attempt.end_after_kill = time.monotonic() - killed
                break
            time.sleep(1.0)
        attempt.code = proc.wait()
        attempt.reached = last_step(out)
        rows = metrics(out)
        if logged_since(out, wall):  # else killed before it wrote a row: they are older ones
            attempt.losses = {k: v for k, v in rows.items() if k > attempt.resumed_from}
        if attempt.killed_rank is None and attempt.code != 0:
            break  # it failed by itself: report, do not loop
    return attempts


def uninterrupted(out: Path, target: int, seconds: float, every: int, log) -> int:
    """Phase 2: the same command until it has logged step ``target`` (or ``seconds`` pass)."""
    proc = launch(out, every, log)
    began = time.monotonic()
    while proc.poll() is None and last_step(out) < target and time.monotonic() - began < seconds:
        time.sleep(1.0)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return last_step(out)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def _compare(what: str, ours: dict[int, float], ref: dict[int, float]) -> str:
    """One line: how ``ours`` matches the uninterrupted run at every step both logged."""
    common = sorted(set(ours) & set(ref))
    if not common:
        return f"- {what}: no step in common with the uninterrupted run."
    diffs = [abs(ours[s] - ref[s]) for s in common]
    equal = sum(d == 0 for d in diffs)
    text = (
        f"- {what}: {len(common)} steps in common ({common[0]}..{common[-1]}), {equal} exactly "
        f"equal, max |difference| {max(diffs):.3g}"
    )
    if equal < len(diffs):
        first = next(s for s in common if ours[s] != ref[s])
        text += f"; first differing step {first} ({ours[first]!r} vs {ref[first]!r})"
    return text + "."


def report(attempts: list[Attempt], ours: dict[int, float], ref: dict[int, float]) -> list[str]:
    lines = [
        "| attempt | resumed from step | reached step | killed rank | job ended after kill (s) "
        "| RSS first / peak / last (MiB, both ranks) | exit code |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(attempts):
        mem = [r for _, r in a.rss]
        rss_text = f"{_mib(mem[0])} / {_mib(max(mem))} / {_mib(mem[-1])}" if mem else "-"
        ended = "-" if a.end_after_kill is None else f"{a.end_after_kill:.1f}"
        killed = "-" if a.killed_rank is None else str(a.killed_rank)
        lines.append(
            f"| {i} | {a.resumed_from} | {a.reached} | {killed} | {ended} | {rss_text} | {a.code} |"
        )
    lines += ["", _compare("the stitched curve (metrics.jsonl at the end)", ours, ref)]
    logged = [(a.losses, f"attempt {i}") for i, a in enumerate(attempts)]
    lines += [
        _compare(f"{name}'s own rows, before the next restart", rows, ref) for rows, name in logged
    ]
    peaks = [max(r for _, r in a.rss) for a in attempts if a.rss]
    if peaks:
        lines.append(
            f"Peak RSS per attempt (MiB): {', '.join(_mib(p) for p in peaks)}; last attempt's "
            f"peak / first's: {peaks[-1] / peaks[0]:.3f}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="total wall time, about")
    parser.add_argument("--kill-every", type=float, default=240.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times and ranks")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="steps between saves")
    parser.add_argument("--out", default="", help="results file (default bench/results/...)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    first = args.minutes * 60 * 0.6
    with tempfile.TemporaryDirectory(prefix="shardflow-soak-") as tmp:
        log_path = Path(tmp) / "launches.log"
        with open(log_path, "w") as log:
            every = args.checkpoint_every
            attempts = stitched(Path(tmp) / "stitched", first, args.kill_every, rng, every, log)
            ours = metrics(Path(tmp) / "stitched")
            target = max([max(a.losses, default=0) for a in attempts] + [0])
            rest = args.minutes * 60 - first + 60
            uninterrupted(Path(tmp) / "reference", target, rest, every, log)
            ref = metrics(Path(tmp) / "reference")
        tail = log_path.read_text().splitlines()[-5:]
    lines = report(attempts, ours, ref)
    print("\n".join(lines))
    date = datetime.date.today().isoformat()
    path = Path(args.out) if args.out else RESULTS / f"soak-{date}.md"
    header = results_head(
        f"Soak: the quickstart under random SIGKILLs, {date}",
        "bench/soak.py",
        f"gloo, 2 FSDP2 ranks; shared with other jobs (load average {os.getloadavg()[0]:.1f} "
        "at the end).",
    )
    footer = ["", "Last lines of the launches' output:", "", "```", *tail, "```"]
    path.write_text("\n".join(header + lines + footer) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
