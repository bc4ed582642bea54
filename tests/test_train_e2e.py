"""End to end: 2-rank FSDP2 runs under torchrun (gloo), kill and resume, bad input, HF models.

Every distributed run is a real ``python -m torch.distributed.run --standalone`` launch (the
rendezvous port is chosen at run time) with a timeout; assertions read the metrics JSONL.
Single-process cases (compare, the Hugging Face model, an unknown optimizer) run in-process to
keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist import run_on_ranks
from safetensors.torch import load_file

import shardflow.train.loop as loop
from shardflow.distributed.comm import record_collectives
from shardflow.train import ckpt
from shardflow.train.cli import hyper_for, main_compare, main_train
from shardflow.train.config import ConfigError, load_config
from shardflow.train.data import ByteTokenizer, load_corpus
from shardflow.train.loop import build_model_and_optimizer
from shardflow.train.metrics import read_metrics
from shardflow.train.placement import ProcessInfo, process_group_for

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
COMPARE = str(ROOT / "launch" / "compare.py")

TINY = """
[run]
name = "tiny"
out_dir = "{out}"
seed = 3
nproc = 2
device = "cpu"

[model]
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_dim = 128
max_seq_len = 32

[data]
max_bytes = 200_000
seq_len = 32

[placement]
kind = "fsdp"

[optim]
name = "dolphinflow"
lr = 3e-3

[[optim.groups]]
pattern = "embed|norm"
weight_decay = 0.0

[[optim.groups]]
pattern = ".*"

[schedule]
warmup_steps = 2

[train]
steps = 8
micro_batch = 4
grad_accum = 2
eval_every = 4
eval_batches = 2

[checkpoint]
every = 4
keep = 2

[log]
progress = false
plot = true
"""


def tiny_config(tmp_path: Path, name: str = "tiny", **replace: str) -> Path:
    text = TINY.format(out=tmp_path / name)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def launch(script: str, args: list[str], nproc: int = 2, timeout: int = 120, env=None):
    """torchrun ``script`` with ``nproc`` ranks; returns the CompletedProcess."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        script,
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def index_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "index.json").read_text())


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 2-rank FSDP2 run of 8 steps, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("full")
    result = launch(TRAIN, [str(tiny_config(tmp))])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "tiny", result


def test_fsdp_two_ranks_end_to_end(full_run):
    out, result = full_run
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    vals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 4, 8]
    assert (out / "loss.png").stat().st_size > 10_000
    weights = load_file(out / "final" / "model.safetensors")
    assert "embed.weight" in weights and weights["embed.weight"].shape == (257, 64)  # gathered
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000008",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["placement"] == "fsdp" and summary["world_size"] == 2
    assert summary["state_bytes_per_param"] == 8.0  # DolphinFlow's own figure: m and v in fp32
    assert all(0 < r["grad_norm"] < float("inf") for r in rows)  # the optimizer's norm
    assert (
        "validation loss" in result.stdout and f"loss curve:  {out / 'loss.png'}" in result.stdout
    )


def test_ddp_matches_fsdp(full_run, tmp_path):
    """The same 2-rank run under DDP (DolphinFlow's owner plan over averaged gradients) takes
    the same steps as under FSDP2: same batches per rank, same maths; only the order of float
    sums differs (tolerance: 1e-4 relative over 8 steps)."""
    args = [str(tiny_config(tmp_path)), "--placement.kind", "ddp", "--log.plot", "false"]
    result = launch(TRAIN, args)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = [r["loss"] for r in train_rows(tmp_path / "tiny")]
    fsdp = [r["loss"] for r in train_rows(full_run[0])]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["placement"] == "ddp" and summary["world_size"] == 2
    print("max relative difference", max(abs(a - b) / b for a, b in zip(ddp, fsdp)))
    assert ddp == pytest.approx(fsdp, rel=1e-4)


def test_kill_and_resume_matches_uninterrupted(full_run, tmp_path):
    """Rank 0 is SIGKILLed at step 6; the rerun resumes from step 4 and ends where the
    uninterrupted run ended (same data, same state: the same losses)."""
    config = tiny_config(tmp_path)
    killed = launch(TRAIN, [str(config)], env={"SHARDFLOW_TEST_KILL_AT_STEP": "6"})
    assert killed.returncode != 0
    out = tmp_path / "tiny"
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    resumed = launch(TRAIN, [str(config)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stderr
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    reference = train_rows(full_run[0])
    for mine, ref in zip(rows, reference):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-5)
    assert [r["lr"] for r in rows] == [r["lr"] for r in reference]  # the schedule resumed too


class Interrupted(Exception):
    """Stands in for a crash in an in-process run."""


def test_one_process_resume_gives_the_uninterrupted_lr_sequence(tmp_path, monkeypatch):
    """Placement offload (the schedule drives the host-side optimizer), stopped by an error at
    step 6 and resumed from the step-4 checkpoint: the same lr at every step, the same losses."""
    config = tiny_config(tmp_path)
    args = [str(config), "--run.nproc", "1", "--placement.kind", "offload", "--log.plot", "false"]
    args += ["--train.eval_every", "0", "--checkpoint.save_model", "false"]
    assert main_train([*args, "--run.out_dir", str(tmp_path / "whole")]) == 0
    real_step = loop._train_step

    def crash_at_6(model, optimizer, cfg, corpus, step, *rest):
        if step == 6:
            raise Interrupted
        return real_step(model, optimizer, cfg, corpus, step, *rest)

    monkeypatch.setattr(loop, "_train_step", crash_at_6)
    with pytest.raises(Interrupted):
        main_train([*args, "--run.out_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(loop, "_train_step", real_step)
    assert main_train([*args, "--run.out_dir", str(tmp_path / "cut")]) == 0
    whole, cut = train_rows(tmp_path / "whole"), train_rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    assert [r["lr"] for r in cut] == [r["lr"] for r in whole]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    warmup, peak = 2, 3e-3
    assert whole[0]["lr"] == pytest.approx(peak / warmup) and whole[1]["lr"] == peak


def one_step(cfg_args: list[str], tmp_path: Path, monkeypatch) -> tuple[Any, float, list]:
    """Build the run's model and optimizer in one process and take one loop step; returns the
    optimizer, the grad norm the loop reports and the max_norm of every clip_grad_norm_ call."""
    config, *overrides = one_process(tiny_config(tmp_path))
    cfg = load_config(config, [*overrides, *cfg_args])
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def counting_clip(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    model, optimizer, _ = build_model_and_optimizer(cfg, torch.device("cpu"), None)
    corpus = load_corpus(cfg.data, ByteTokenizer())
    _, norm = loop._train_step(model, optimizer, cfg, corpus, 1, ProcessInfo(0, 1, 0), "cpu")
    return optimizer, norm, calls


def test_shardflow_optimizer_clips_and_reports_the_norm_once(tmp_path, monkeypatch):
    """A ShardFlow optimizer gets optim.grad_clip as gradient_clipping and the loop reports its
    last_grad_norm: no second norm pass. grad_clip = 0 turns its clipping off."""
    opt, norm, calls = one_step(["--optim.grad_clip", "0.25"], tmp_path, monkeypatch)
    assert calls == [] and opt.gradient_clipping == 0.25
    assert norm == opt.last_grad_norm and norm > 0.25  # clipped: the norm is above the bound
    opt, norm, calls = one_step(["--optim.grad_clip", "0"], tmp_path, monkeypatch)
    assert calls == [] and opt.gradient_clipping is None and norm == opt.last_grad_norm


def test_adamw_is_clipped_by_the_loop(tmp_path, monkeypatch):
    opt, norm, calls = one_step(
        ["--optim.name", "adamw", "--optim.grad_clip", "0.25"], tmp_path, monkeypatch
    )
    assert type(opt) is torch.optim.AdamW and calls == [0.25] and norm > 0.25
    _, _, calls = one_step(
        ["--optim.name", "adamw", "--optim.grad_clip", "0"], tmp_path, monkeypatch
    )
    assert calls == [float("inf")]  # no clipping; the norm is still measured for the metrics


def _ddp_step(rank, world, config):
    """One runtime step on a DDP-wrapped model: the optimizer got grads_reduced=True."""
    cfg = load_config(config, ["--placement.kind", "ddp", "--optim.hyper.ortho_mode", "matrix"])
    mesh = process_group_for(cfg, torch.device("cpu"))
    model, optimizer, _ = build_model_and_optimizer(cfg, torch.device("cpu"), mesh)
    corpus = load_corpus(cfg.data, ByteTokenizer())
    with record_collectives() as log:
        loop._train_step(model, optimizer, cfg, corpus, 1, ProcessInfo(rank, world, rank), "cpu")
    return optimizer.placement.grads_reduced, log.by_name()


def test_ddp_runtime_passes_grads_reduced_to_the_optimizer(tmp_path):
    for reduced, calls in run_on_ranks(_ddp_step, 2, tiny_config(tmp_path), timeout=120):
        assert reduced is True
        assert "all_to_all_single" not in calls, calls  # DDP reduced them; the optimizer did not


def test_two_rank_checkpoint_resumes_in_one_process(full_run, tmp_path, capsys):
    """The 2-rank FSDP2 checkpoint of step 8 loads in one process (placement none): the weights
    equal the 2-rank run's exported final weights, and training continues from there."""
    out = tmp_path / "tiny"
    shutil.copytree(full_run[0], out)
    config = tiny_config(tmp_path)
    assert main_train([*one_process(config), "--train.steps", "10", "--log.plot", "false"]) == 0
    assert "resumed from step 8" in capsys.readouterr().err
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[8]["loss"] < rows[0]["loss"] - 0.5  # continues from the trained weights

    cfg = load_config(config, ["--run.nproc", "1", "--placement.kind", "none"])
    model, optimizer, _ = build_model_and_optimizer(cfg, torch.device("cpu"), None)
    ckpt.resume(full_run[0] / "checkpoints", model=model, optimizer=optimizer)
    exported = load_file(full_run[0] / "final" / "model.safetensors")
    assert exported.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, exported[name]), name


def test_offload_matches_one_process(tmp_path):
    """Placement offload (host-side optimizer on a float32 master copy) takes the same steps as
    placement none: on this CPU machine both copies are CPU tensors, the maths is identical."""
    config = tiny_config(tmp_path, **{"every = 4": "every = 2"})
    losses = {}
    for kind in ("none", "offload"):
        args = [str(config), "--run.nproc", "1", "--placement.kind", kind]
        args += ["--train.steps", "4", "--run.out_dir", str(tmp_path / kind), "--log.plot", "false"]
        assert main_train(args) == 0
        losses[kind] = [r["loss"] for r in train_rows(tmp_path / kind)]
    assert losses["offload"] == pytest.approx(losses["none"], rel=1e-6, abs=1e-6)
    a = load_file(tmp_path / "none" / "final" / "model.safetensors")
    b = load_file(tmp_path / "offload" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6)
    index = index_of(tmp_path / "offload" / "checkpoints" / "step_00000004")
    assert index["optimizer"]["class"] == "DolphinFlow" and index["world_size"] == 1


def test_process_count_mismatch_fails_cleanly(tmp_path):
    result = launch(TRAIN, [str(tiny_config(tmp_path)), "--run.nproc", "3"], timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "shardflow: error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]  # printed by rank 0 only
    assert "run.nproc=3 but 2 process(es) were launched" in errors[0]


def test_missing_data_fails_cleanly_on_every_rank(tmp_path):
    config = str(tiny_config(tmp_path))
    result = launch(TRAIN, [config, "--data.paths", str(tmp_path / "nowhere")], timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("shardflow: error: data.paths[0]=") == 1, result.stderr[-3000:]


def one_process(config: Path) -> list[str]:
    """Overrides that turn the tiny config into a single-process run (no torchrun)."""
    return [str(config), "--run.nproc", "1", "--placement.kind", "none"]


def test_unknown_optimizer_fails_before_training(tmp_path, capsys):
    code = main_compare([*one_process(tiny_config(tmp_path)), "--optimizers", "adamw,adamx"])
    assert code == 2
    assert "optim.name='adamx' is not a known optimizer" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_compare_draws_all_optimizers(tmp_path):
    names = "adamw,dolphinflow"
    config = tiny_config(tmp_path, **{"steps = 8": "steps = 3", "every = 4": "every = 0"})
    code = main_compare([*one_process(config), "--optimizers", names, "--lrs", "1e-3,3e-3"])
    assert code == 0
    base = tmp_path / "tiny"
    summaries = json.loads((base / "compare.json").read_text())
    assert [s["name"] for s in summaries] == [
        "adamw-lr0.001",
        "adamw-lr0.003",
        "dolphinflow-lr0.001",
        "dolphinflow-lr0.003",
    ]
    assert all(s["final_loss"] < s["first_loss"] for s in summaries)
    assert (base / "compare.png").stat().st_size > 10_000
    assert "| run | optimizer | lr |" in (base / "compare.md").read_text()


def test_compare_hyper_goes_to_optimizers_that_take_it():
    names = ["adamw", "factored_adam", "whiteflow"]
    hyper = {"factored": False, "betas": (0.9, 0.95)}
    assert hyper_for("adamw", hyper, names) == {"betas": (0.9, 0.95)}
    assert hyper_for("factored_adam", hyper, names) == hyper
    assert hyper_for("dolphinflow", {}, names) == {}
    # DolphinFlow8bit takes **kwargs and passes them to DolphinFlow: followed up the MRO
    assert hyper_for("dolphinflow8bit", {"factored": False, "ortho_mode": "vector"}, names) == {
        "ortho_mode": "vector"
    }
    with pytest.raises(ConfigError, match=r"optim\.hyper\.factord is an argument of none of"):
        hyper_for("adamw", {"factord": False}, names)


# ---------------------------------------------------------------------- Hugging Face model


def make_tiny_hf_model(path: Path) -> None:
    """A random 2-layer LlamaConfig model and a small BPE tokenizer saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    sample = (ROOT / "shardflow" / "train" / "loop.py").read_text().splitlines()
    tok.train_from_iterator(sample, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_tiny_hf_model_fine_tunes_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_tiny_hf_model(tmp_path / "hf")
    config = tiny_config(tmp_path, name="hfrun")
    args = [
        str(config),
        "--model.kind",
        "hf",
        "--model.path",
        str(tmp_path / "hf"),
        "--train.steps",
        "6",
        "--checkpoint.every",
        "3",
        "--log.plot",
        "false",
    ]
    assert main_train(one_process(config)[:1] + args[1:] + one_process(config)[1:]) == 0
    out = tmp_path / "hfrun"
    rows = train_rows(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert saved.config.num_hidden_layers == 2
    changed = [
        name
        for name, p in saved.named_parameters()
        if not p.detach().equal(dict(original.named_parameters())[name].detach())
    ]
    assert changed, "the saved model equals the original: fine-tuning did not reach the file"
    exported = load_file(out / "final" / "model.safetensors")
    assert exported.keys() == original.state_dict().keys()  # Hugging Face names, no wrapper
    assert index_of(out / "checkpoints" / "step_00000006")["model"] is not None
    assert transformers.AutoTokenizer.from_pretrained(out / "final").eos_token == "</s>"
