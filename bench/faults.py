"""The runtime under faults and bad input: every probe of issue 18 as a real launch, one table.

Run (CPU, about 10 minutes on a busy 2-core machine; each probe is bounded by --timeout):

    .venv/bin/python bench/faults.py                 # every probe
    .venv/bin/python bench/faults.py -k sigterm -k nccl    # probes whose name holds a word

Each probe launches ``launch/train.py`` on ``configs/quickstart.toml`` shrunk to a 0.09 M-param
model (2 FSDP2 ranks under torchrun, or one process), in a folder of its own, and records the
exit code, the seconds it took (and, for a failure or a signal during training, the seconds from
that moment to the end of the job) and the first ``shardflow:`` line (or warning) it printed.
Targets: a rank-local failure ends the whole job with the real message within 30 s; bad input is
one message from rank 0 and exit code 2 (torchrun itself then exits 1, the workers' code is in
its report); SIGTERM saves a checkpoint at the current step and the workers exit 0.

The library probes of issue 18 (different settings per rank, values the optimizers refuse,
``load_state_dict`` of foreign state, edited checkpoint indexes) run a short script in a fresh
process (``_snippet``; on 2 gloo ranks under torchrun where ranks matter) or resume a tiny run
whose checkpoint index was edited (``_edited_checkpoint``).

Results go to ``bench/results/faults-<date>.md`` with the command and the machine.
``tests/test_faults.py`` runs some of these probes and asserts their outcomes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command_text, results_head  # noqa: E402
from shardflow.train.metrics import FAIL_ENV  # noqa: E402  (rank 0's metrics write fails: ENOSPC)

RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "quickstart.toml"
TRAIN = ROOT / "launch" / "train.py"

TINY = [
    "--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4",
    "--model.n_kv_heads", "2", "--model.ffn_dim", "128", "--model.max_seq_len", "32",
    "--data.seq_len", "32", "--data.max_bytes", "200000", "--train.steps", "8",
    "--train.micro_batch", "4", "--train.eval_every", "4", "--train.eval_batches", "2",
    "--schedule.warmup_steps", "2", "--checkpoint.every", "4", "--log.progress", "false",
    "--log.plot", "false",
]  # fmt: skip
"""The quickstart (2 ranks, FSDP2, DolphinFlow) shrunk to 0.09 M params and 8 steps."""

ONE = ["--run.nproc", "1", "--placement.kind", "none"]
"""Overrides for a one-process run (no torchrun)."""


@dataclass
class Outcome:
    """One launch: exit code, seconds, and its output lines with the time each arrived."""

    code: int
    seconds: float
    lines: list[tuple[float, str]]
    trigger: float | None = None
    """When the fault happened (a signal sent, a failure printed), seconds from the start."""
    notes: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def after_trigger(self) -> float | None:
        """Seconds from the fault to the end of the job."""
        return None if self.trigger is None else self.seconds - self.trigger

    @property
    def worker_codes(self) -> list[int]:
        """The failed workers' exit codes from torchrun's report ([] when none failed)."""
        return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", self.output)]

    def count(self, text: str) -> int:
        return sum(text in line for _, line in self.lines)

    def first_message(self) -> str:
        """The first ``shardflow:`` line (a failure's: with its exception's line), else the
        first warning, else the last line."""
        for i, (_, line) in enumerate(self.lines):
            if line.startswith("shardflow:") and line.endswith("failed:"):
                error = next(
                    (x for _, x in self.lines[i:] if re.match(r"[\w.]+(Error|Exception)\b", x)), ""
                )
                return f"{line} ... {error}"
            if line.startswith("shardflow:") or line.startswith("stopped by"):
                return line
        for _, line in self.lines:
            if "Warning:" in line:
                return line[line.index("Warning:") :]
        return self.lines[-1][1] if self.lines else ""

    def time_of(self, pattern: str) -> float | None:
        """When the first line matching ``pattern`` arrived."""
        return next((t for t, line in self.lines if re.search(pattern, line)), None)


def train_rows(out: Path) -> int:
    """Training rows in ``out/metrics.jsonl`` so far (lines that parse)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = 0
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows += "loss" in json.loads(line)
    return rows


def launch(
    out: Path,
    args: list[str],
    *,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    send: tuple[signal.Signals, int] | None = None,
    timeout: float = 240,
) -> Outcome:
    """``launch/train.py`` on the tiny quickstart writing to ``out`` (torchrun with ``nproc``
    ranks, plain python for 1); ``send=(signal, n)`` sends the signal to the launcher once
    ``n`` training rows are in the metrics. Output lines are timestamped as they arrive; past
    ``timeout`` the launch's process group is killed (code 124)."""
    cmd = [str(TRAIN), str(CONFIG), *TINY, "--run.out_dir", str(out)]
    cmd += ONE if nproc == 1 else []
    return run(cmd + args, out, nproc=nproc, env=env, send=send, timeout=timeout)


def run(
    cmd: list[str],
    out: Path,
    *,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    send: tuple[signal.Signals, int] | None = None,
    timeout: float = 240,
) -> Outcome:
    """``python cmd...`` (under torchrun with ``nproc`` ranks when ``nproc`` > 1), timed line by
    line; ``send`` and ``timeout`` as in :func:`launch` (``out``: where training rows appear)."""
    runner = [sys.executable]
    if nproc > 1:
        runner += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    began = time.monotonic()
    proc = subprocess.Popen(
        [*runner, *cmd],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - began, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    trigger = None
    code = None
    while code is None:
        code = proc.poll()
        now = time.monotonic() - began
        if code is None and now > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
            break
        if send and trigger is None and train_rows(out) >= send[1]:
            proc.send_signal(send[0])
            trigger = time.monotonic() - began
        time.sleep(0.05)
    seconds = time.monotonic() - began
    reader.join(timeout=5)
    result = Outcome(code, seconds, lines, trigger)
    if trigger is None:
        result.trigger = result.time_of(r"^shardflow: (rank \d+ failed|error)")
    return result


# ------------------------------------------------------------------------------------- probes


def _file_where_out_dir_goes(tmp: Path) -> Outcome:
    (tmp / "blocker").write_text("a file, not a folder\n")
    return launch(tmp / "blocker" / "run", [])


def _metrics_full_disk(tmp: Path) -> Outcome:
    return launch(tmp / "run", [], env={FAIL_ENV: "3"})


def _sigint(tmp: Path) -> Outcome:
    return launch(tmp / "run", ["--train.steps", "400"], send=(signal.SIGINT, 3))


def _sigterm_then_restart(tmp: Path) -> Outcome:
    out = tmp / "run"
    stopped = launch(
        out, ["--train.steps", "400", "--checkpoint.every", "0"], send=(signal.SIGTERM, 3)
    )
    held = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    stopped.notes.append(f"checkpoints after SIGTERM: {held}")
    again = launch(out, ["--train.steps", str(_step_of(stopped) + 2)])
    resumed = re.search(r"resumed from step \d+", again.output)
    stopped.notes.append(
        f"restart: exit {again.code}, {resumed.group(0) if resumed else 'did not resume'}"
    )
    return stopped


def _step_of(outcome: Outcome) -> int:
    found = re.search(r"after step (\d+)", outcome.output)
    return int(found.group(1)) if found else 0


def _truncated_metrics(tmp: Path) -> Outcome:
    out = tmp / "run"
    first = launch(out, ["--train.steps", "4"], nproc=1)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 4.1, "lr"')  # a write cut short
    again = launch(out, ["--train.steps", "6"], nproc=1)
    again.notes.append(f"first run exit {first.code}; rows after resume: {train_rows(out)}")
    return again


def _corrupt_metrics(tmp: Path) -> Outcome:
    out = tmp / "run"
    launch(out, ["--train.steps", "4"], nproc=1)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return launch(out, ["--train.steps", "6"])


def _changed_hyperparameters(tmp: Path) -> Outcome:
    out = tmp / "run"
    launch(out, ["--train.steps", "4"], nproc=1)
    changed = ["--optim.weight_decay", "0.05", "--optim.hyper.momentum", "0.8"]
    return launch(out, ["--train.steps", "6", *changed], nproc=1)


def _resume_false_in_used_folder(tmp: Path) -> Outcome:
    out = tmp / "run"
    launch(out, ["--train.steps", "4"], nproc=1)
    return launch(out, ["--checkpoint.resume", "false"])


def _resume_at_the_end(tmp: Path) -> Outcome:
    out = tmp / "run"
    launch(out, ["--train.steps", "4"], nproc=1)
    return launch(out, ["--train.steps", "4"])


def _another_runs_checkpoint(tmp: Path) -> Outcome:
    out = tmp / "run"
    launch(out, ["--train.steps", "4"], nproc=1)
    (out / "run.json").write_text('{"run_id": "someone-else"}\n')
    return launch(out, ["--train.steps", "6"])


def _bad(args: list[str]) -> Callable[[Path], Outcome]:
    return lambda tmp: launch(tmp / "run", args)


def _hf_without_weights(tmp: Path) -> Outcome:
    (tmp / "hf").mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 300,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
    }  # fmt: skip
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return launch(tmp / "run", ["--model.kind", "hf", "--model.path", str(tmp / "hf")])


def _latin1_and_binary(tmp: Path) -> Outcome:
    data = tmp / "data"
    data.mkdir()
    for i in range(20):
        (data / f"doc{i}.txt").write_text(f"plain text document {i}. " * 200)
    (data / "latin1.txt").write_bytes("café déjà vu, naïve façade. ".encode("latin-1") * 300)
    (data / "blob.txt").write_bytes(bytes(range(256)) * 200)
    return launch(tmp / "run", ["--data.paths", str(data), "--train.steps", "2"], nproc=1)


def _huge_file(tmp: Path) -> Outcome:
    big = tmp / "big.txt"
    line = ("the quick brown fox jumps over the lazy dog " * 20 + "\n").encode()
    with open(big, "wb") as fh:
        for _ in range((1 << 30) // len(line)):
            fh.write(line)
    args = ["--data.paths", str(big), "--data.max_bytes", "100000", "--train.steps", "2"]
    args += ["--data.val_fraction", "0.2"]
    wrapped = [
        "-c",
        "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\ntry: runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e: code = e.code\n"
        "print('peak RSS MiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "sys.exit(code)",
    ]
    out = tmp / "run"
    cmd = [sys.executable, *wrapped, str(TRAIN), str(CONFIG), *TINY, *ONE, "--run.out_dir"]
    began = time.monotonic()
    done = subprocess.run(
        [*cmd, str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = [(0.0, line) for line in (done.stdout + done.stderr).splitlines()]
    result = Outcome(done.returncode, time.monotonic() - began, lines)
    rss = re.search(r"peak RSS MiB (\d+)", done.stdout)
    result.notes.append(
        f"1 GiB file, data.max_bytes=100000: peak RSS {rss.group(1) if rss else '?'} MiB "
        "(reading the whole file would take at least 1024)"
    )
    big.unlink()
    return result


def _snippet(body: str, nproc: int = 1) -> Callable[[Path], Outcome]:
    """A probe running ``body`` (Python, indented 4 spaces, after :data:`PRELUDE`) in a fresh
    process, or on ``nproc`` gloo ranks under torchrun: its first line says ``shardflow: ok:``
    with what it printed, or ``shardflow: <Error>: <message>`` (exit code 1) when it raised."""

    def probe(tmp: Path) -> Outcome:
        script = tmp / "probe.py"
        script.write_text(PRELUDE + body + EPILOGUE)
        return run([str(script)], tmp, nproc=nproc, timeout=180)

    return probe


PRELUDE = """\
import math, os, sys
import torch
import torch.distributed as dist
from torch import nn
from shardflow import DolphinFlow, WhiteFlow
from shardflow.optim.factored import FactoredAdam

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 8))

def train(m, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        m(torch.ones(4, 64)).sum().backward()
        opt.step()

rank = 0
if "RANK" in os.environ:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
try:
"""
EPILOGUE = """
except Exception as exc:
    if rank == 0:
        print(f"shardflow: {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1)
finally:
    if dist.is_initialized():
        dist.destroy_process_group()
"""

FSDP_ORTHO = """\
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    m = model()
    mesh = init_device_mesh("cpu", (2,))
    for layer in (m[0], m[2], m):
        fully_shard(layer, mesh=mesh)
    opt = DolphinFlow(m.parameters(), ortho_mode=("vector", "matrix")[rank], process_group=mesh)
    train(m, opt)
    print("shardflow: ok: trained")
"""

DDP_LR = """\
    m = model()
    opt = DolphinFlow(m.parameters(), lr=(1e-3, 2e-3)[rank], process_group=dist.group.WORLD)
    train(m, opt)
    print("shardflow: ok: trained")
"""

REFUSE = """\
    m = model()
    {build}
    print("shardflow: ok: accepted")
"""

EMPTY_MATRIX = """\
    p, q = nn.Parameter(torch.zeros(5, 0)), nn.Parameter(torch.randn(4, 4))
    opt = WhiteFlow([p, q])
    p.grad, q.grad = torch.zeros(5, 0), torch.randn(4, 4)
    opt.step()
    print("shardflow: ok: stepped, the (5, 0) parameter updated element-wise")
"""

LOAD = """\
    saver = {saver}
    theirs = {cls}(saver.parameters())
    train(saver, theirs, 1)
    m = model()
    opt = DolphinFlow(m.parameters())
    opt.load_state_dict(theirs.state_dict())
    train(m, opt, 1)
    print("shardflow: ok: loaded and stepped")
"""
WIDER = "nn.Sequential(nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 8))"

LOAD_8BIT = """\
    from shardflow.optim.dolphinflow8bit import DolphinFlow8bit
    m = model()
    full = DolphinFlow(m.parameters())
    train(m, full, 1)
    opt = DolphinFlow8bit(m.parameters())
    opt.load_state_dict(full.state_dict())
    print(f"shardflow: ok: exp_avg of the 96x64 weight is {opt.state[m[0].weight]['exp_avg'].dtype}")
"""


def _edited_checkpoint(edit: Callable[[dict], None], rehash: bool) -> Callable[[Path], Outcome]:
    """A probe: train 4 steps (1 process), edit the newest checkpoint's index (keeping its hash
    consistent with ``rehash``, as a careful forger would), then resume."""

    def probe(tmp: Path) -> Outcome:
        from shardflow.checkpoint._format import INDEX_HASH_KEY, index_digest  # noqa: PLC0415

        out = tmp / "run"
        first = launch(out, ["--train.steps", "4"], nproc=1)
        path = out / "checkpoints" / "step_00000004" / "index.json"
        index = json.loads(path.read_text())
        edit(index)
        if rehash:
            index[INDEX_HASH_KEY] = index_digest(index)
        path.write_text(json.dumps(index))
        again = launch(out, ["--train.steps", "6"], nproc=1)
        again.notes.append(f"first run exit {first.code}")
        return again

    return probe


def _group_value(key: str, value: object) -> Callable[[dict], None]:
    return lambda index: index["optimizer"]["param_groups"][0].update({key: value})


def _file_outside(index: dict) -> None:
    (name,) = index["files"]
    index["files"]["../outside/x.safetensors"] = index["files"].pop(name)
    for record in index["tensors"].values():
        for piece in record["pieces"]:
            piece[0] = "../outside/x.safetensors"


PROBES: dict[str, tuple[str, Callable[[Path], Outcome]]] = {
    "rank0-metrics-full-disk": ("rank 0 fails after the process group started (ENOSPC on metrics)", _metrics_full_disk),
    "sigint": ("Ctrl-C: SIGINT to torchrun at step 3", _sigint),
    "sigterm": ("SIGTERM to torchrun at step 3, then the same command again", _sigterm_then_restart),
    "out-dir-under-file": ("run.out_dir under a file", _file_where_out_dir_goes),
    "metrics-truncated": ("last line of metrics.jsonl cut short, restart (1 process)", _truncated_metrics),
    "metrics-corrupt": ("a line before the last of metrics.jsonl is not JSON, restart", _corrupt_metrics),
    "resume-changed-hyper": ("restart with weight_decay 0.05, momentum 0.8 (1 process)", _changed_hyperparameters),
    "resume-false-used-dir": ("checkpoint.resume=false in a folder with checkpoints", _resume_false_in_used_folder),
    "resume-at-end": ("restart when the newest checkpoint is at train.steps", _resume_at_the_end),
    "resume-other-run": ("run.json names another run than the checkpoints", _another_runs_checkpoint),
    "group-key-misspelled": ("[[optim.groups]] key ortho_mod", _bad(["--optim.groups", '[{pattern = "embed|norm", ortho_mod = "none"}, {pattern = ".*"}]'])),
    "group-key-adamw": ("group key ortho_mode with optim.name=adamw", _bad(["--optim.name", "adamw"])),
    "group-key-factored": ("group key ortho_mode with optim.name=factored_adam", _bad(["--optim.name", "factored_adam"])),
    "hyper-misspelled": ("--optim.hyper.betaa2 0.99", _bad(["--optim.hyper.betaa2", "0.99"])),
    "hyper-beta2": ("--optim.hyper.beta2 1.5", _bad(["--optim.hyper.beta2", "1.5"])),
    "lr-nan": ("--optim.lr nan", _bad(["--optim.lr", "nan"])),
    "hf-no-weights": ("model.kind=hf, a folder with config.json and no weights", _hf_without_weights),
    "nccl-on-cpu": ("placement.backend=nccl on a CPU", _bad(["--placement.backend", "nccl"])),
    "data-latin1-binary": ("data: a Latin-1 file and a binary file among text (1 process)", _latin1_and_binary),
    "data-huge-file": ("data: one 1 GiB text file, data.max_bytes=100000 (1 process)", _huge_file),
    "ranks-ortho-mode-fsdp2": ("DolphinFlow, FSDP2, 2 ranks: ortho_mode vector on rank 0, matrix on rank 1 (was: deadlock)", _snippet(FSDP_ORTHO, nproc=2)),
    "ranks-lr-ddp": ("DolphinFlow, DDP-aware, 2 ranks: lr 1e-3 on rank 0, 2e-3 on rank 1 (was: silently mixed)", _snippet(DDP_LR, nproc=2)),
    "optim-lr-inf": ("DolphinFlow(lr=inf) (was: accepted)", _snippet(REFUSE.format(build="DolphinFlow(m.parameters(), lr=math.inf)"))),
    "optim-lr-true": ("WhiteFlow(lr=True) (was: accepted)", _snippet(REFUSE.format(build="WhiteFlow(m.parameters(), lr=True)"))),
    "optim-wd-inf": ("FactoredAdam(weight_decay=inf) (was: accepted)", _snippet(REFUSE.format(build="FactoredAdam(m.parameters(), weight_decay=math.inf)"))),
    "optim-complex": ("WhiteFlow over a complex64 parameter (was: imaginary part zeroed)", _snippet(REFUSE.format(build="WhiteFlow([*m.named_parameters(), ('rotor', nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)))])"))),
    "optim-empty-matrix": ("WhiteFlow with a (5, 0) parameter, one step (was: ZeroDivisionError)", _snippet(EMPTY_MATRIX)),
    "load-other-optimizer": ("DolphinFlow.load_state_dict(WhiteFlow's state_dict) (was: fails at the next step)", _snippet(LOAD.format(saver="model()", cls="WhiteFlow"))),
    "load-other-shapes": ("DolphinFlow.load_state_dict of a wider model's state (was: fails at the next step)", _snippet(LOAD.format(saver=WIDER, cls="DolphinFlow"))),
    "load-32bit-into-8bit": ("DolphinFlow8bit.load_state_dict(DolphinFlow's state_dict) (was: kept in fp32)", _snippet(LOAD_8BIT)),
    "ckpt-index-edited": ("resume after weight_decay edited in index.json, hash not updated (was: loaded)", _edited_checkpoint(_group_value("weight_decay", 0.5), rehash=False)),
    "ckpt-beta2": ("resume, index rehashed with beta2 = 1.5 (was: loaded)", _edited_checkpoint(_group_value("beta2", 1.5), rehash=True)),
    "ckpt-ortho-bogus": ("resume, index rehashed with ortho_mode = 'bogus' (was: loaded)", _edited_checkpoint(_group_value("ortho_mode", "bogus"), rehash=True)),
    "ckpt-file-outside": ("resume, index rehashed naming ../outside/x.safetensors (was: loaded)", _edited_checkpoint(_file_outside, rehash=True)),
    "ckpt-version-0": ("resume, index version 0", _edited_checkpoint(lambda index: index.update(version=0), rehash=True)),
    "ckpt-version-str": ("resume, index version \"1\"", _edited_checkpoint(lambda index: index.update(version="1"), rehash=True)),
    "ckpt-version-missing": ("resume, index without a version", _edited_checkpoint(lambda index: index.pop("version"), rehash=True)),
}  # fmt: skip
"""Probe key -> (what it does, function(tmp folder) -> Outcome)."""


def row(name: str, what: str, outcome: Outcome, tmp: str = "") -> str:
    """One table row; ``tmp`` (the probes' temporary folder) is shown as ``$TMP`` so that the
    message, cut at 400 characters, keeps what it says rather than a long path."""
    workers = outcome.worker_codes
    code = f"{outcome.code}" + (f" (workers {sorted(set(workers))})" if workers else "")
    seconds = f"{outcome.seconds:.1f}"
    if outcome.after_trigger is not None:
        seconds += f" ({outcome.after_trigger:.1f} after the fault)"
    message = outcome.first_message().replace("|", "\\|")
    if tmp:
        message = message.replace(tmp, "$TMP")
    if len(message) > 400:
        message = message[:397] + "..."
    notes = "; ".join(outcome.notes).replace("|", "\\|")
    return f"| {name} | {what} | {code} | {seconds} | {message} | {notes} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run probes whose key holds this")
    parser.add_argument("--out", default="", help="results file (default bench/results/...)")
    parser.add_argument(
        "--merge",
        default="",
        help="an earlier results file: replace (or add) the rows of the probes run, keep the others",
    )
    args = parser.parse_args()
    import tempfile

    chosen = {k: v for k, v in PROBES.items() if not args.k or any(w in k for w in args.k)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardflow-faults-") as tmp:
        for key, (what, probe) in chosen.items():
            folder = Path(tmp) / key
            folder.mkdir()
            outcome = probe(folder)
            rows.append(row(key, what, outcome, tmp))
            print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    path = Path(args.out) if args.out else RESULTS / f"faults-{date}.md"
    head = results_head(
        f"Faults and bad input, {date}",
        "bench/faults.py",
        "gloo; shared with other jobs, so seconds are loose.",
    )
    command = command_text("bench/faults.py")
    header = [
        *head,
        "Exit code: the launcher's (torchrun exits 1 whenever a worker fails, and on a signal; "
        "the failed workers' codes from its report in parentheses). Seconds: the whole launch, "
        "including ~10-20 s of start-up; for a fault during training, also from the fault (the "
        "signal sent, or the failing rank's message) to the end of the job.",
        "",
        "| probe | what | exit code | seconds | first message | notes |",
        "|---|---|---|---|---|---|",
    ]
    if args.merge:
        merged = merge(Path(args.merge).read_text(), rows, command, date)
        Path(args.out or args.merge).write_text(merged)
        print(f"wrote {args.out or args.merge}")
        return
    path.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {path}")


def merge(earlier: str, rows: list[str], command: str, date: str) -> str:
    """``earlier`` (a results file) with each row of ``rows`` replacing the row of the same probe
    (or appended), and a line under its command saying which rows were re-run, by what, when."""
    lines = earlier.rstrip("\n").split("\n")
    index = {line.split("|")[1].strip(): i for i, line in enumerate(lines) if line.startswith("| ")}
    for new in rows:
        key = new.split("|")[1].strip()
        if key in index:
            lines[index[key]] = new
        else:
            lines.append(new)
    names = ", ".join(r.split("|")[1].strip() for r in rows)
    at = next(i for i, line in enumerate(lines) if line.startswith("Command:")) + 1
    lines.insert(at, f"Rows {names}: `{command}` on {date}, same machine.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
