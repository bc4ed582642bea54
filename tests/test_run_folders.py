"""Run folders that cannot surprise (issue 19): a run resumes only its own checkpoint (same run id,
same model and optimizer) and says what it resumed; another run's folder stops it with the
choices; ``--run.overwrite`` and ``--run.timestamped``; ``compare`` in a folder of its own; the
``shardflow`` command. One process, the tiny quickstart of bench/faults.py."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from bench.faults import CONFIG, ONE, TINY
from shardflow.cli import main
from shardflow.train.config import load_config, split_overrides
from shardflow.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def args_for(out: Path, *extra: str) -> list[str]:
    return [str(CONFIG), *TINY, *ONE, "--run.out_dir", str(out), "--train.steps", "4", *extra]


def steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_the_same_run_resumes_and_says_what_it_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *args_for(out)]) == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert f"new run {run_id} in {out}" in capsys.readouterr().err
    assert main(["train", *args_for(out, "--train.steps", "6", "--optim.lr", "2e-3")]) == 0
    err = capsys.readouterr().err
    assert f"resumed from step 4 of 6: run {run_id} (dolphinflow on the builtin model" in err
    assert f"checkpoint {out / 'checkpoints' / 'step_00000004'}" in err
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_another_optimizer_or_model_in_the_folder_stops_with_the_choices(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *args_for(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    other = ["--optim.name", "factored_adam", "--optim.groups", "[]"]
    assert main(["train", *args_for(out, "--train.steps", "6", *other)]) == 2
    err = capsys.readouterr().err
    assert "holds another run (dolphinflow on the builtin model" in err
    assert "optim.name: 'dolphinflow' -> 'factored_adam'" in err
    for choice in ("--run.name NEW", "--run.out_dir", "--run.timestamped", "--run.overwrite"):
        assert choice in err
    assert main(["train", *args_for(out, "--train.steps", "6", "--model.dim", "32")]) == 2
    assert "model.dim: 64 -> 32" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # untouched


def test_results_without_a_checkpoint_are_not_replaced_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *args_for(out, "--checkpoint.every", "0")]) == 0
    capsys.readouterr()
    assert main(["train", *args_for(out, "--checkpoint.every", "0")]) == 2
    assert "no checkpoint to resume it from" in capsys.readouterr().err


def test_overwrite_starts_afresh_in_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *args_for(out)]) == 0
    first = json.loads((out / "run.json").read_text())["run_id"]
    (out / "notes.txt").write_text("mine")
    other = ["--optim.name", "adamw", "--optim.groups", "[]", "--run.overwrite"]  # a bare flag
    assert main(["train", *args_for(out, *other)]) == 0
    assert "run.overwrite: deleted checkpoints, final, metrics.jsonl" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["run_id"] != first
    assert steps(out) == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "adamw"
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is deleted


def test_timestamped_writes_a_fresh_folder_each_launch(tmp_path):
    base = tmp_path / "run"
    for _ in range(2):
        assert main(["train", *args_for(base, "--run.timestamped", "--checkpoint.every", "0")]) == 0
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run-"))
    assert len(folders) == 2 and not base.exists(), folders
    saved = json.loads((tmp_path / folders[0] / "config.json").read_text())
    assert saved["run"]["out_dir"] == str(tmp_path / folders[0])  # the folder it used


def test_compare_writes_to_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(CONFIG), *TINY, *ONE, "--train.steps", "2", "--checkpoint.every", "0"]
    assert main(["train", *args]) == 0
    assert (
        main(["compare", *args, "--optimizers", "adamw,dolphinflow", "--optim.groups", "[]"]) == 0
    )
    compared = tmp_path / "runs" / "quickstart-compare"
    assert (compared / "compare.md").is_file() and (compared / "adamw" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "quickstart" / "compare.md").exists()


def test_a_bool_field_alone_means_true():
    assert split_overrides(["--run.overwrite", "--optim.lr", "1"]) == [
        ("run.overwrite", "true"),
        ("optim.lr", "1"),
    ]
    assert load_config(CONFIG, ["--run.timestamped"]).run.timestamped is True


def test_the_shardflow_command(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["shardflow"] == "shardflow.cli:main"
    assert main(["plan", str(CONFIG)]) == 0
    assert capsys.readouterr().out.startswith("DRY RUN quickstart")
    assert main(["fly", str(CONFIG)]) == 2
    assert "unknown command 'fly'; use one of train, compare, plan" in capsys.readouterr().err
    for wrapper in ("train.py", "compare.py"):
        assert "sys.path" not in (ROOT / "launch" / wrapper).read_text()


def test_summary_records_where_and_how_the_run_ran(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *args_for(out, "--checkpoint.every", "0")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["placement"] == "none" and summary["world_size"] == 1
    assert summary["optimizer"] == "dolphinflow"
    assert summary["precision"]["weights"] == "float32"
    assert summary["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    commit = summary["commit"]
    assert commit is None or len(commit.removesuffix("+dirty")) == 40  # None outside git
