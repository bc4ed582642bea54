"""``[model] compile = true``: the run's model is torch.compiled in place (CPU, a tiny model):
the same losses as eager, the same parameter names in the checkpoint and the exported weights."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from bench.faults import CONFIG, ONE, TINY
from shardflow.cli import main
from shardflow.train.metrics import read_metrics


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_compiled_model_trains_like_eager(tmp_path):
    args = [str(CONFIG), *TINY, *ONE, "--train.steps", "3", "--train.eval_every", "0"]
    args += ["--checkpoint.every", "3"]
    losses, weights = {}, {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        extra = ["--model.compile", "true"] if mode == "compiled" else []
        assert main(["train", *args, "--run.out_dir", str(out), *extra]) == 0
        losses[mode] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        weights[mode] = load_file(out / "final" / "model.safetensors")
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert weights["compiled"].keys() == weights["eager"].keys()  # no _orig_mod. prefix
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert saved["model"]["compile"] is True
