"""The runtime's HSDP placement: ``[placement] kind = "hsdp"`` with ``shard_size``.

- the mesh's shape: ``shard_size``, else torchrun's LOCAL_WORLD_SIZE (ranks per node), else
  run.nproc; a size that does not divide the ranks is a ConfigError naming the field;
- 4 gloo ranks as 2 replicas x 2 shards through the runtime's own functions (mesh, placed model,
  optimizer, train step): the parameters are DTensors placed (Replicate(), Shard(0)), the
  optimizer's placement works in the shard group, the replicas hold the same bits after two
  steps (the runtime's replica check passes, and fires once a replica is nudged);
- the whole run under torchrun (4 CPU processes, 2x2, the replica check every 2 steps,
  checkpoints): it trains and finishes;
- the shipped configs/llama3-70b-hsdp-4x8.toml dry-runs on this CPU and prints both mesh
  dimensions, the owner plan of one shard group, and bytes per rank per step by link, with only
  the gradient all-reduce crossing nodes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not by every forked rank (seconds each)
from dist import run_on_ranks
from test_train_e2e import TRAIN, launch, tiny_config

import shardflow.train.loop as loop
from shardflow.train.config import ConfigError, load_config
from shardflow.train.data import ByteTokenizer, load_corpus
from shardflow.train.loop import build_model_and_optimizer
from shardflow.train.placement import ProcessInfo, hsdp_shape, process_group_for
from shardflow.train.plan import dry_run

ROOT = Path(__file__).resolve().parent.parent
HSDP = ["--placement.kind", "hsdp", "--run.nproc", "4", "--optim.hyper.ortho_mode", "matrix"]


def test_shard_size_defaults_to_ranks_per_node_and_must_divide_the_ranks(tmp_path, monkeypatch):
    cfg = load_config(tiny_config(tmp_path), HSDP)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hsdp_shape(cfg, 4) == (1, 4)  # no torchrun: one node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hsdp_shape(cfg, 4) == (2, 2)
    cfg = load_config(tiny_config(tmp_path), [*HSDP, "--placement.shard_size", "3"])
    with pytest.raises(ConfigError, match=r"placement.shard_size=3 does not divide the 4 ranks"):
        hsdp_shape(cfg, 4)
    with pytest.raises(ConfigError, match=r"placement.shard_size=-1 must not be negative"):
        dry_run(load_config(tiny_config(tmp_path), [*HSDP, "--placement.shard_size", "-1"]))


def _hsdp_steps(rank, world, config):
    """Two runtime steps on the 2x2 HSDP mesh; then one replica nudged, the check again."""
    from torch.distributed.tensor import DTensor, Replicate, Shard  # noqa: PLC0415

    from shardflow.distributed.replicas import ReplicaDivergence  # noqa: PLC0415

    cfg = load_config(config, [*HSDP, "--placement.shard_size", "2"])
    mesh = process_group_for(cfg, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, torch.device("cpu"), mesh)
    corpus = load_corpus(cfg.data, ByteTokenizer())
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    assert {tuple(p.placements) for p in params.values()} == {(Replicate(), Shard(0))}
    assert optimizer.placement.world_size == 2 and optimizer.placement.replicate_group is not None
    # data: each of the 4 ranks reads its own batch (rank = global rank)
    for step in (1, 2):
        loop._train_step(model, optimizer, cfg, corpus, step, ProcessInfo(rank, world, rank), "cpu")
    names = {p: n for n, p in params.items()}
    loop.check_replicas(optimizer, names=names)  # what the loop calls every N steps
    if rank == 3:
        w = params["layers.1.mlp.down.weight"].to_local()
        with torch.no_grad():
            w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1.0))
    try:
        loop.check_replicas(optimizer, names=names)
    except ReplicaDivergence as exc:
        return str(exc)
    return None


def test_runtime_hsdp_on_four_ranks_keeps_replicas_identical(tmp_path):
    config = tiny_config(tmp_path)
    for rank, message in enumerate(run_on_ranks(_hsdp_steps, 4, config, timeout=240)):
        assert message is not None, f"rank {rank}: the nudged replica went unnoticed"
        assert "parameter 'layers.1.mlp.down.weight' differs between the replicas" in message


def test_llama3_70b_hsdp_dry_run_prints_both_mesh_dims_owners_and_bytes_by_link():
    cfg = load_config(ROOT / "configs" / "llama3-70b-hsdp-4x8.toml")
    text = dry_run(cfg)
    assert re.search(r"70\.5\d\dB params", text) and "placement=hsdp, 32 rank(s)" in text
    assert "mesh (HSDP): replicate=4 x shard=8" in text
    assert "owner plan over the 8 ranks of each shard group" in text
    assert "max/mean: NS load 1.000" in text  # 560 matrices over 8 owners
    rows = dict(
        (m.group(1).strip(), (m.group(2), float(m.group(3))))
        for m in re.finditer(
            r"\n  (?!total)(\S[^\n]*?)\s+(intra-node|inter-node)\s+([\d.]+) GiB", text
        )
    )
    assert {name for name, (link, _) in rows.items() if link == "inter-node"} == {
        "HSDP all-reduce"
    }, rows
    assert rows["NS all-to-all (2 rounds)"][0] == "intra-node"
    # the gradient shard (reduce-scatter bytes / 7) all-reduced over 4 replicas: 2 * 3/4 of it
    shard = rows["FSDP2 reduce-scatter"][1] / 7
    assert rows["HSDP all-reduce"][1] == pytest.approx(2 * shard * 3 / 4, rel=1e-3)


def test_torchrun_hsdp_two_by_two_trains_with_the_replica_check(tmp_path):
    overrides = [
        "--run.nproc", "4", "--placement.kind", "hsdp", "--placement.shard_size", "2",
        "--placement.replica_check_every", "2", "--train.steps", "4", "--train.eval_every", "0",
        "--checkpoint.every", "2", "--log.plot", "false",
    ]  # fmt: skip
    result = launch(TRAIN, [str(tiny_config(tmp_path)), *overrides], nproc=4, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "placement=hsdp, 4 rank(s)" in text and "step 4/4" in text and "done: tiny" in text
    assert (tmp_path / "tiny" / "checkpoints").is_dir()
