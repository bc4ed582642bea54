"""The README's Python blocks run as written (issue 19): in order, in one namespace, in a
scratch folder, as a reader would paste them; the two distributed blocks (DDP-aware and FSDP2)
on 2 gloo ranks, with ``MyTransformer`` the built-in decoder and ``"cuda"`` read as ``"cpu"``.
A block that imports transformers is skipped without it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dist import run_on_ranks

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
    assert sum(any(k in b for k in DISTRIBUTED) for b in blocks) == 2


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


def test_distributed_blocks_run_on_two_gloo_ranks():
    blocks = [b for b in python_blocks() if any(k in b for k in DISTRIBUTED)]
    placements = [run_on_ranks(_run_block, 2, block, timeout=180) for block in blocks]
    # the DDP-aware owner plan, then FSDP2-aware sharding, on both ranks
    assert placements == [["ReplicatedPlacement"] * 2, ["ShardedPlacement"] * 2], placements
