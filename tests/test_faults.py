"""The runtime under faults and bad input (issue 18): a failure on one rank ends the job with its
message in seconds, signals stop it cleanly, resume follows one rule, bad input is one message
and exit code 2, odd data is reported.

Rank faults are real launches of launch/train.py under torchrun (2 gloo ranks), through
``bench/faults.py``'s launcher (timestamped output, a signal sent after N training rows);
everything else runs in-process, one process, on the same tiny quickstart.
"""

from __future__ import annotations

import json
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch

from bench.faults import CONFIG, FAIL_ENV, ONE, TINY, launch
from shardflow.checkpoint import read_index
from shardflow.checkpoint._format import INDEX_HASH_KEY, index_digest
from shardflow.train import ckpt
from shardflow.train import data as data_module
from shardflow.train.cli import main_compare, main_train
from shardflow.train.config import DataConfig, load_config
from shardflow.train.data import load_corpus, read_documents
from shardflow.train.loop import build_model_and_optimizer
from shardflow.train.metrics import read_metrics

SECONDS_AFTER_FAULT = 30
"""A fault during training ends the whole job within this many seconds (the collective
timeout it used to wait out is 1800 s)."""


def args_for(out: Path, *extra: str) -> list[str]:
    """main_train arguments: the tiny quickstart in one process, writing to ``out``."""
    return [str(CONFIG), *TINY, *ONE, "--run.out_dir", str(out), *extra]


def rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl", warn=False) if "loss" in r]


# ------------------------------------------------------------------ rank faults, torchrun


def test_rank0_failure_after_the_process_group_started_ends_the_job_promptly(tmp_path):
    """Rank 0's metrics write fails (ENOSPC, the test hook) while rank 1 waits in the next
    step's all-gather: rank 0 prints its traceback first and leaves, rank 1's collective fails
    and it says so; the job ends within seconds, not after the 30-minute collective timeout."""
    result = launch(tmp_path / "run", [], env={FAIL_ENV: "3"})
    assert result.code != 0, result.output[-3000:]
    assert result.after_trigger is not None, result.output[-3000:]
    assert result.after_trigger < SECONDS_AFTER_FAULT, result.output[-3000:]
    failed = result.time_of(r"^shardflow: rank 0 failed")
    error = result.time_of(r"OSError: \[Errno 28\] No space left on device")
    assert failed is not None and error is not None, result.output[-3000:]
    peer = result.time_of(r"^shardflow: rank 1 stopped: a collective failed")
    assert peer is None or peer >= failed  # the real error comes first
    assert result.count("Traceback") <= 2  # rank 0's, and torchrun's own report


def test_sigint_to_torchrun_ends_the_job_promptly(tmp_path):
    """Ctrl-C (SIGINT to torchrun, which passes it to each worker): no rank waits in a shutdown
    barrier, so nothing needs torchrun's SIGKILL 30 s later."""
    result = launch(tmp_path / "run", ["--train.steps", "400"], send=(signal.SIGINT, 3))
    assert result.trigger is not None and result.code != 0, result.output[-3000:]
    assert result.after_trigger < SECONDS_AFTER_FAULT, result.output[-3000:]
    assert "forcefully exiting via SIGKILL" not in result.output
    assert "interrupted (SIGINT)" in result.output


def test_sigterm_checkpoints_the_current_step_and_a_restart_resumes(tmp_path):
    """SIGTERM to torchrun (a scheduler's warning) after 3 steps: every rank stops after the
    same step, a checkpoint of that step is written (checkpoint.every = 0: none otherwise), the
    workers exit 0; the same command resumes from it."""
    out = tmp_path / "run"
    stopped = launch(
        out, ["--train.steps", "400", "--checkpoint.every", "0"], send=(signal.SIGTERM, 3)
    )
    found = re.search(r"stopped by SIGTERM after step (\d+): checkpoint (\S+);", stopped.output)
    assert found, stopped.output[-3000:]
    step = int(found.group(1))
    assert step >= 3 and stopped.after_trigger < SECONDS_AFTER_FAULT
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    assert read_index(out / "checkpoints" / f"step_{step:08d}")["extra"]["step"] == step
    assert stopped.worker_codes == [], stopped.output[-3000:]  # no worker failed
    assert "shardflow: rank" not in stopped.output
    assert [r["step"] for r in rows(out)] == list(range(1, step + 1))

    again = launch(out, ["--train.steps", str(step + 2)])
    assert again.code == 0, again.output[-3000:]
    assert f"resumed from step {step}" in again.output
    assert [r["step"] for r in rows(out)] == list(range(1, step + 3))


def test_bad_input_under_torchrun_is_one_message_and_exit_code_2(tmp_path):
    result = launch(tmp_path / "run", ["--optim.hyper.betaa2", "0.99"])
    assert result.count("shardflow: error:") == 1, result.output[-3000:]
    assert "optim.hyper.betaa2 is not an argument of dolphinflow. Did you mean 'beta2'?" in (
        result.output
    )
    assert 2 in result.worker_codes and set(result.worker_codes) <= {2, -15}
    assert result.count("Traceback") <= 1  # torchrun's own report of the failed workers


# --------------------------------------------------------------------- run folder, resume


def test_out_dir_under_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / "blocker").write_text("not a folder")
    assert main_train(args_for(tmp_path / "blocker" / "run")) == 2
    assert "cannot be created: " in capsys.readouterr().err


def test_truncated_last_metrics_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 4.1, "lr"')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: the last line is cut short"):
        assert main_train(args_for(out, "--train.steps", "6")) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_corrupt_metrics_line_is_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main_train(args_for(out, "--train.steps", "6")) == 2
    assert re.search(r"metrics\.jsonl:2 is not JSON .*fix or delete", capsys.readouterr().err)


def test_resume_keeps_the_configs_hyperparameters_and_logs_each_change(tmp_path):
    """The config wins for every hyperparameter (weight_decay, momentum, a group's ortho_mode,
    lr), the checkpoint supplies the state; each value that differs is logged."""
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    changed = [
        "--optim.weight_decay",
        "0.05",
        "--optim.hyper.momentum",
        "0.8",
        "--optim.lr",
        "2e-3",
        "--optim.groups",
        '[{pattern = "embed|lm_head|norm", ortho_mode = "vector"}, {pattern = ".*"}]',
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main_train(args_for(out, "--train.steps", "6", *changed)) == 0
    text = " ".join(str(w.message) for w in caught)
    assert "the config's hyperparameters win" in text, text
    for key, old, new in [
        ("weight_decay", "0.0", "0.05"),
        ("momentum", "0.9", "0.8"),
        ("lr", "0.003", "0.002"),
        ("ortho_mode", "None", "'vector'"),
    ]:
        assert re.search(rf"param group \d {key}: checkpoint {old} -> config {new}", text), key
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["weight_decay"] == 0.05 and saved["optim"]["hyper"]["momentum"] == 0.8

    # the optimizer after resume holds the config's values, whatever the checkpoint held
    cfg = load_config(CONFIG, [*TINY, *ONE, "--run.out_dir", str(out), *changed])
    model, optimizer, _ = build_model_and_optimizer(cfg, torch.device("cpu"), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.resume(out / "checkpoints", model=model, optimizer=optimizer)
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05]
    assert [g["momentum"] for g in groups] == [0.8, 0.8]
    assert [g["ortho_mode"] for g in groups] == ["vector", optimizer.defaults["ortho_mode"]]
    assert [g["lr"] for g in groups] == [2e-3, 2e-3]


def test_a_forged_checkpoint_index_is_bad_input_on_resume(tmp_path, capsys):
    """An index whose hash was updated after beta2 was set to 1.5: one message, exit code 2."""
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    path = out / "checkpoints" / "step_00000004" / "index.json"
    index = json.loads(path.read_text())
    index["optimizer"]["param_groups"][0]["beta2"] = 1.5
    index[INDEX_HASH_KEY] = index_digest(index)
    path.write_text(json.dumps(index))
    capsys.readouterr()
    assert main_train(args_for(out, "--train.steps", "6")) == 2
    err = capsys.readouterr().err
    assert re.search(r"step_00000004' cannot be loaded: .*beta2=1\.5 is invalid", err), err
    assert "Traceback" not in err


def test_resume_false_in_a_folder_with_checkpoints_is_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    assert main_train(args_for(out, "--checkpoint.resume", "false")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume=false, but" in err and "step_00000004" in err
    for choice in ("delete that folder", "another run.out_dir", "checkpoint.resume=true"):
        assert choice in err
    assert main_train(args_for(tmp_path / "fresh", "--checkpoint.resume", "false")) == 0


def test_checkpoints_carry_the_run_id_and_another_runs_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    for path in ckpt.checkpoints(out / "checkpoints"):
        assert read_index(path)["extra"]["run_id"] == run_id
    (out / "run.json").write_text('{"run_id": "someone-else"}\n')
    assert main_train(args_for(out, "--train.steps", "6")) == 2
    err = capsys.readouterr().err
    assert f"was written by run '{run_id}'" in err and "belongs to run 'someone-else'" in err


def test_resume_at_train_steps_says_so_and_reports_nothing_as_this_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    capsys.readouterr()
    summary = (out / "summary.json").read_text()
    assert main_train(args_for(out, "--train.steps", "4")) == 0
    captured = capsys.readouterr()
    assert "nothing to train: the newest checkpoint" in captured.err
    assert "at step 4 and train.steps=4" in captured.err
    assert "done:" not in captured.out and "validation loss" not in captured.out
    assert (out / "summary.json").read_text() == summary  # untouched


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--optim.groups", '[{pattern = "embed", ortho_mod = "none"}, {pattern = ".*"}]'],
            r"optim\.groups\[0\]\.ortho_mod is not a param-group key of dolphinflow\. "
            r"Did you mean 'ortho_mode'\?",
        ),
        (
            ["--optim.name", "adamw"],
            r"optim\.groups\[0\]\.ortho_mode is not a param-group key of adamw\. Only "
            r"dolphinflow, whiteflow take it; remove it from that group",
        ),
        (
            ["--optim.name", "factored_adam"],
            r"optim\.groups\[0\]\.ortho_mode is not a param-group key of factored_adam\. Only "
            r"dolphinflow, whiteflow take it",
        ),
        (
            ["--optim.hyper.betaa2", "0.99"],
            r"optim\.hyper\.betaa2 is not an argument of dolphinflow\. Did you mean 'beta2'\?",
        ),
        (
            ["--optim.hyper.beta2", "1.5"],
            r"\[optim\] / \[optim\.hyper\]: dolphinflow refused a value: beta2=1\.5 is invalid",
        ),
        (["--optim.lr", "nan"], r"optim\.lr=nan must be a finite number"),
        (
            ["--optim.groups", '[{pattern = "embed", momentum = 2.0}, {pattern = ".*"}]'],
            r"\[\[optim\.groups\]\]: dolphinflow refused a value: momentum=2\.0 is invalid",
        ),
        (
            ["--run.nproc", "2", "--placement.kind", "ddp", "--placement.backend", "nccl"],
            r"placement\.backend='nccl' needs CUDA devices, but this run is on cpu",
        ),
    ],
    ids=[
        "group-key-misspelled",
        "group-key-adamw",
        "group-key-factored",
        "hyper-misspelled",
        "beta2",
        "lr-nan",
        "group-value",
        "nccl-on-cpu",
    ],
)
def test_bad_input_is_one_message_before_the_process_group(tmp_path, capsys, extra, message):
    args = args_for(tmp_path / "run", *extra)
    if "--run.nproc" in extra:  # a 2-process config checked in this one process: rank 0's view
        from shardflow.train.config import ConfigError
        from shardflow.train.loop import preflight
        from shardflow.train.placement import ProcessInfo

        cfg = load_config(args[0], args[1:])
        with pytest.raises(ConfigError, match=message):
            preflight(cfg, ProcessInfo(0, 2, 0))
        return
    assert main_train(args) == 2
    err = capsys.readouterr().err
    assert err.count("shardflow: error:") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing written, no process group started


def test_hf_folder_without_weights_is_bad_input(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path / "hf")
    extra = ["--model.kind", "hf", "--model.path", str(tmp_path / "hf")]
    assert main_train(args_for(tmp_path / "run", *extra)) == 2
    assert "has config.json but no weights" in capsys.readouterr().err


def test_compare_drops_group_keys_an_optimizer_lacks_with_a_warning(tmp_path):
    args = args_for(tmp_path / "cmp", "--train.steps", "2", "--checkpoint.every", "0")
    args += ["--optimizers", "factored_adam"]
    with pytest.warns(UserWarning, match=r"optim\.groups\[0\]\.ortho_mode is a param-group key "):
        assert main_compare(args) == 0


# ----------------------------------------------------------------------------------- data


def test_non_utf8_files_warn_and_binary_files_are_skipped(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"plain text {i}. " * 100)
    (tmp_path / "latin1.txt").write_bytes("café déjà vu, naïve. ".encode("latin-1") * 50)
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
    cfg = DataConfig(paths=[str(tmp_path)], seq_len=16)
    with pytest.warns(UserWarning) as caught:
        docs, _ = read_documents(cfg)
    text = str(caught[0].message)
    assert re.search(r"latin1\.txt: \d+\.\d\d% of its characters were not UTF-8", text), text
    assert re.search(r"blob\.txt: \d+% of its text is not UTF-8 or NUL; skipped as binary", text)
    assert {key for key, _ in docs} == {f"doc{i}.txt" for i in range(10)} | {"latin1.txt"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(cfg, data_module.ByteTokenizer(), warn=False)  # other ranks: silent


def test_max_bytes_bounds_what_is_read(tmp_path, monkeypatch):
    """A 30 MB file with data.max_bytes = 50 000: at most that many bytes are read (a plain
    file: at most what its first max_doc_bytes characters can take), not the whole file."""
    (tmp_path / "big.txt").write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 700_000)
    (tmp_path / "big.jsonl").write_text(
        "\n".join(json.dumps({"text": f"record {i} " * 20}) for i in range(150_000))
    )
    reads = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            reads.append(n)
            return self.fh.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(data_module, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    found = {}
    for name in ("big.txt", "big.jsonl"):
        reads.clear()
        docs, _ = read_documents(DataConfig(paths=[str(tmp_path / name)], max_bytes=50_000))
        assert reads and all(0 < n <= 50_001 for n in reads), (name, reads)
        found[name] = docs
    assert [len(text) for _, text in found["big.txt"]] == [50_000]
    assert len(found["big.jsonl"]) > 200  # the records within the first 50 000 bytes
