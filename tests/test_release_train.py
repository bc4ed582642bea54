"""``[train] gradient_release = true`` in the runtime: the same run as the ordinary step."""

from __future__ import annotations

import re

import pytest
from test_train_e2e import TRAIN, launch, tiny_config

from shardflow.train.cli import main_train
from shardflow.train.config import ConfigError, check_values, load_config
from shardflow.train.metrics import read_metrics

ONE_PROCESS = {
    "nproc = 2": "nproc = 1",
    'kind = "fsdp"': 'kind = "none"',
    "grad_accum = 2": "grad_accum = 1",
    "lr = 3e-3": "lr = 3e-3\ngrad_clip = 0.0",
}


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_release_run_equals_the_ordinary_run(tmp_path, capsys):
    """Without clipping (optim.grad_clip = 0) the per-block release applies the same updates as
    the ordinary step: the same loss at every step, checkpoints and resume as usual."""
    path = tiny_config(tmp_path, **ONE_PROCESS)
    assert main_train([str(path), "--run.out_dir", str(tmp_path / "plain")]) == 0
    args = [str(path), "--run.out_dir", str(tmp_path / "rel"), "--train.gradient_release", "true"]
    assert main_train(args) == 0
    plain, released = _losses(tmp_path / "plain"), _losses(tmp_path / "rel")
    assert len(plain) == 8
    assert released == plain
    assert main_train([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gradient release: \d+ buckets .* gradients alive at most 0\.1 MiB", out)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (["--placement.kind", "fsdp"], "placement.kind='fsdp'.*'none' or 'ddp'"),
        (["--train.grad_accum", "2"], "train.grad_accum=2.*set grad_accum=1"),
        (["--optim.name", "adamw"], "needs a ShardFlow optimizer"),
    ],
)
def test_what_release_cannot_honour_is_a_config_error(tmp_path, override, pattern):
    path = tiny_config(tmp_path, **ONE_PROCESS)
    cfg = load_config(path, ["--train.gradient_release", "true", *override])
    with pytest.raises(ConfigError, match=pattern):
        check_values(cfg)


def test_release_on_two_ddp_ranks_follows_the_ddp_wrapped_run(tmp_path):
    """placement ddp with release: no DDP wrapper, the owner plan averages each block's
    gradients (all-to-all) — the losses follow the DDP-wrapped ordinary run up to the order of
    the fp32 gradient average (1e-4 relative over 8 steps)."""
    overrides = {
        "grad_accum = 2": "grad_accum = 1",
        'kind = "fsdp"': 'kind = "ddp"',
        "lr = 3e-3": "lr = 3e-3\ngrad_clip = 0.0",
    }
    path = tiny_config(tmp_path, **overrides)
    for name, extra in (("plain", []), ("rel", ["--train.gradient_release", "true"])):
        done = launch(TRAIN, [str(path), "--run.out_dir", str(tmp_path / name), *extra])
        assert done.returncode == 0, done.stderr[-3000:]
    plain, released = _losses(tmp_path / "plain"), _losses(tmp_path / "rel")
    assert len(plain) == 8
    assert released == pytest.approx(plain, rel=1e-4)
