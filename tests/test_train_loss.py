"""``[train] loss = "stablemax"``: the runtime trains on StableMax cross-entropy and logs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_e2e import one_process, tiny_config, train_rows

from shardflow.losses import stablemax_cross_entropy
from shardflow.train.cli import main_train
from shardflow.train.config import ConfigError, load_config
from shardflow.train.data import ByteTokenizer, load_corpus, sample_batch
from shardflow.train.loop import build_model_and_optimizer


def test_stablemax_run_logs_the_stablemax_loss_of_the_first_batch(tmp_path):
    config, *overrides = one_process(tiny_config(tmp_path))
    args = [*overrides, "--train.loss", "stablemax", "--train.grad_accum", "1"]
    args += ["--train.steps", "3", "--train.eval_every", "3", "--checkpoint.every", "0"]
    args += ["--checkpoint.save_model", "false", "--log.plot", "false"]
    assert main_train([config, *args]) == 0

    cfg = load_config(config, args)
    model, _, _ = build_model_and_optimizer(cfg, torch.device("cpu"), None)
    corpus = load_corpus(cfg.data, ByteTokenizer())
    x, y = sample_batch(
        corpus.train, cfg.data.seq_len, cfg.train.micro_batch, cfg.run.seed, "train", 1, 0, 0
    )
    with torch.no_grad():
        logits = model(x).float().flatten(0, 1)
    stable = stablemax_cross_entropy(logits, y.flatten()).item()
    softmax = F.cross_entropy(logits, y.flatten()).item()
    rows = train_rows(tmp_path / "tiny")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(stable, rel=1e-5)
    assert rows[0]["loss"] != pytest.approx(softmax, rel=1e-2)  # not softmax's (5.34 vs 5.42)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_an_unknown_loss_names_the_choices(tmp_path):
    config, *overrides = one_process(tiny_config(tmp_path))
    with pytest.raises(ConfigError, match="train.loss='stablemx' is not one of softmax, stablemax"):
        load_config(config, [*overrides, "--train.loss", "stablemx"])
