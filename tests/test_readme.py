"""The README's Python blocks run as written (issue 19): in order, in one namespace, in a
scratch folder, as a reader would paste them; the distributed blocks (DDP-aware and FSDP2 on 2
gloo ranks, HSDP on 4 as a 2x2 mesh), with ``MyTransformer`` the built-in decoder and ``"cuda"`` read as ``"cpu"``.
A block that imports transformers is skipped without it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dist import run_on_ranks

from bench.faults import TINY

ROOT = Path(__file__).resolve().parent.parent

DISTRIBUTED = ("dist.group.WORLD", "init_device_mesh")
"""A block that needs a process group holds one of these."""

PRELUDE = """
import torch
import torch.distributed as dist
import shardflow
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from shardflow.train.config import ModelConfig
from shardflow.train.model import build_decoder

world_size, device = dist.get_world_size(), torch.device("cpu")
nodes, gpus_per_node = (2, world_size // 2) if world_size == 4 else (1, world_size)

def MyTransformer():
    model = build_decoder(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    model.reset_parameters(0)
    return model

model = MyTransformer()
"""
"""What a distributed block assumes: a process group, ``world_size``, ``device``, a model."""


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 7
    assert sum(any(k in b for k in DISTRIBUTED) for b in blocks) == 3


def test_single_process_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for block in python_blocks():
        if any(k in block for k in DISTRIBUTED):
            continue
        if "import transformers" in block:
            try:
                import transformers  # noqa: F401
            except ImportError:
                continue
        exec(compile(block, "README.md", "exec"), namespace)
        ran += 1
    assert ran >= 5
    out = capsys.readouterr().out
    loss = float(re.search(r"loss after 20 steps: ([\d.]+) nats/byte", out).group(1))
    assert loss < 4.5  # the DolphinFlow snippet learns (ln 257 = 5.55 at the start)
    assert "10.0" in out  # the low-precision block's state bytes
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the checkpoint block


def _run_block(rank: int, world: int, block: str) -> str:
    namespace: dict = {"__name__": "readme"}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    exec(compile(block.replace('"cuda"', '"cpu"'), "README.md", "exec"), namespace)
    opt = namespace["opt"]
    return type(opt.placement).__name__


def test_distributed_blocks_run_on_gloo_ranks():
    blocks = [b for b in python_blocks() if any(k in b for k in DISTRIBUTED)]
    worlds = [4 if "mesh2d" in b else 2 for b in blocks]  # HSDP: a 2x2 mesh
    placements = [run_on_ranks(_run_block, w, b, timeout=180) for b, w in zip(blocks, worlds)]
    # the DDP-aware owner plan, FSDP2-aware sharding, then HSDP (sharding in the shard group)
    assert placements == [
        ["ReplicatedPlacement"] * 2,
        ["ShardedPlacement"] * 2,
        ["ShardedPlacement"] * 4,
    ], placements


# ------------------------------------------------------------------------- shell commands

CI_SIZE = [
    *TINY,
    *("--model.max_seq_len", "64", "--data.seq_len", "64", "--data.max_bytes", "100000"),
    *("--train.steps", "2", "--train.micro_batch", "2", "--train.eval_every", "2"),
    *("--train.eval_batches", "1", "--schedule.warmup_steps", "1", "--checkpoint.every", "2"),
]
"""Appended to every train and compare command: bench/faults.py's 0.09 M-param quickstart, 2
steps, rows of 64 tokens (later overrides win: the README's own --train.steps 200 becomes 2)."""

NOT_HERE = ("needs models/", "--nproc-per-node 8", "launch/test.sh", "ruff")
"""Commands this test leaves out: a download, 8 GPUs, the test suite itself, the linter."""


def shell_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuations joined, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def as_run(command: str) -> list[str] | None:
    """The command as this test runs it (this Python, CI-sized), or None when left out."""
    import shlex
    import sys

    if any(word in command for word in NOT_HERE):
        return None
    words = shlex.split(command, comments=True)
    if command.startswith("bash launch/quickstart.sh"):  # its set-up done, its torchrun line
        words = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "shardflow.cli"]
        words += ["train", "configs/quickstart.toml"]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "shardflow":
        words = [sys.executable, "-m", "shardflow.cli", *words[1:]]
    else:
        raise AssertionError(f"a README command this test does not know: {command!r}")
    config = words.index("-m", 3 if "torch.distributed.run" in words else 1)
    sub = words[config + 2] if words[config + 1] == "shardflow.cli" else ""
    return words + (CI_SIZE if sub in ("train", "compare") else [])


@pytest.mark.slow
def test_every_readme_command_in_order_each_in_its_own_folder(tmp_path):
    """A newcomer's session, CI-sized: every command the README shows, in order, in a fresh
    copy of the configs; each succeeds, none is a no-op, and every run writes its own folder."""
    import os
    import shutil
    import subprocess

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    folders, ran = [], 0
    for command in shell_commands():
        argv = as_run(command)
        if argv is None:
            continue
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}\n{output[-3000:]}"
        assert "nothing to train" not in output and "resumed from" not in output, command
        folders += re.findall(r"^new run \w+ in (\S+)$", output, flags=re.M)
        ran += 1
    assert ran >= 10
    assert len(folders) == len(set(folders)) >= 9, folders  # compare: one per run
    assert (tmp_path / "runs" / "quickstart-compare" / "compare.md").is_file()
