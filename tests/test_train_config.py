"""Run configs, routing, data, model, schedule, checkpoints and dry runs (in-process, fast)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from shardflow.train import ckpt
from shardflow.train.config import (
    SECTIONS,
    Config,
    ConfigError,
    GroupRule,
    config_reference,
    field_docs,
    load_config,
)
from shardflow.train.data import ByteTokenizer, load_corpus, sample_batch
from shardflow.train.groups import route_params
from shardflow.train.loop import lr_factor, lr_schedule, preflight
from shardflow.train.model import build_decoder
from shardflow.train.optimizers import build_run_optimizer, state_bytes_per_param
from shardflow.train.placement import ProcessInfo
from shardflow.train.plan import dry_run

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "quickstart.toml",
        "smollm2-135m-1gpu.toml",
        "smollm2-135m-offload.toml",
        "llama3-8b-fsdp8.toml",
    } <= names


def test_unknown_key_names_nearest(tmp_path):
    cfg = write(tmp_path / "c.toml", "[optim]\nlrr = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key optim\.'lrr'.*Did you mean 'lr'"):
        load_config(cfg)


def test_unknown_section_names_nearest(tmp_path):
    cfg = write(tmp_path / "c.toml", "[optimizer]\nlr = 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*Did you mean 'optim'"):
        load_config(cfg)


def test_wrong_type_names_field_value_and_type(tmp_path):
    cfg = write(tmp_path / "c.toml", '[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"train\.steps='ten' has type str; expected int"):
        load_config(cfg)


def test_int_accepted_for_float_and_bool_rejected_for_int(tmp_path):
    assert load_config(write(tmp_path / "a.toml", "[optim]\nlr = 1\n")).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.steps=True .*expected int"):
        load_config(write(tmp_path / "b.toml", "[train]\nsteps = true\n"))


def test_choice_fields(tmp_path):
    cfg = write(tmp_path / "c.toml", '[placement]\nkind = "fsdp2"\n')
    with pytest.raises(ConfigError, match=r"placement\.kind='fsdp2' is not one of"):
        load_config(cfg)


def test_overrides(tmp_path):
    cfg = write(tmp_path / "c.toml", "[optim]\nlr = 1e-3\n")
    out = load_config(
        cfg,
        [
            "--optim.lr",
            "3e-4",
            "--train.steps=7",
            "--run.name",
            "x1",
            "--data.paths",
            "a,b",
            "--log.plot",
            "false",
        ],
    )
    assert out.optim.lr == 3e-4 and out.train.steps == 7 and out.run.name == "x1"
    assert out.data.paths == ["a", "b"] and out.log.plot is False


def test_override_errors(tmp_path):
    cfg = write(tmp_path / "c.toml", "")
    with pytest.raises(ConfigError, match=r"unknown key --optim\.'lrate'.*Did you mean 'lr'"):
        load_config(cfg, ["--optim.lrate", "1"])
    with pytest.raises(ConfigError, match=r"has no value"):
        load_config(cfg, ["--optim.lr"])
    with pytest.raises(ConfigError, match=r"train\.steps='many' has type str"):
        load_config(cfg, ["--train.steps", "many"])


def test_table_overrides(tmp_path):
    cfg = write(tmp_path / "c.toml", "[optim.hyper]\nrank = 8\n")
    out = load_config(
        cfg, ["--optim.hyper.factored", "false", "--optim.hyper.projection_device", "cpu"]
    )
    assert out.optim.hyper == {"rank": 8, "factored": False, "projection_device": "cpu"}
    assert load_config(cfg, ["--optim.hyper", "{rank = 2}"]).optim.hyper == {"rank": 2}
    with pytest.raises(ConfigError, match=r"optim\.hyper is a table; set one key with"):
        load_config(cfg, ["--optim.hyper", "3"])
    with pytest.raises(ConfigError, match=r"optim\.lr is not a table"):
        load_config(cfg, ["--optim.lr.x", "3"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.toml")


def test_groups_parse_none_and_need_pattern(tmp_path):
    text = '[[optim.groups]]\npattern = "embed"\northo_mode = "none"\nlr = 0.1\n'
    cfg = load_config(write(tmp_path / "c.toml", text))
    assert cfg.optim.groups == [GroupRule(pattern="embed", options={"ortho_mode": None, "lr": 0.1})]
    with pytest.raises(ConfigError, match=r"has no 'pattern'"):
        load_config(write(tmp_path / "d.toml", "[[optim.groups]]\nlr = 0.1\n"))


def test_config_reference_documents_every_field():
    text = config_reference()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no doc string"
            assert f"| `{f.name}` |" in text


# ------------------------------------------------------------------------------ routing


def tiny_model(**kw):
    cfg = Config().model
    for key, value in dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, **kw).items():
        setattr(cfg, key, value)
    return build_decoder(cfg)


def test_route_first_match_wins():
    rules = [
        GroupRule(pattern="embed|norm", options={"ortho_mode": None}),
        GroupRule(pattern=r"\.attn\."),
        GroupRule(pattern=".*"),
    ]
    groups = route_params(tiny_model().named_parameters(), rules)
    assert "embed.weight" in groups[0].names and "norm.weight" in groups[0].names
    assert all(".attn." in n for n in groups[1].names)
    assert not any("norm" in n for n in groups[1].names + groups[2].names)
    assert groups[0].as_param_group()["ortho_mode"] is None


def test_route_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"optim\.groups\[1\]\.pattern='lm_head' matches no"):
        rules = [GroupRule(pattern="embed"), GroupRule(pattern="lm_head"), GroupRule(pattern=".*")]
        route_params(model.named_parameters(), rules)
    with pytest.raises(ConfigError, match=r"match no optim\.groups pattern.*pattern = \"\.\*\""):
        route_params(model.named_parameters(), [GroupRule(pattern="embed")])
    with pytest.raises(ConfigError, match=r"not a valid regex"):
        route_params(model.named_parameters(), [GroupRule(pattern="(")])


# --------------------------------------------------------------------------- model, schedule


def test_decoder_shapes_and_tied_embeddings():
    model = tiny_model()
    logits = model(torch.randint(0, 257, (2, 16)))
    assert logits.shape == (2, 16, 257)
    assert "lm_head.weight" not in dict(model.named_parameters())
    untied = tiny_model(tie_embeddings=False)
    assert "lm_head.weight" in dict(untied.named_parameters())


def test_decoder_is_causal():
    model = tiny_model()
    model.reset_parameters(0)
    x = torch.randint(0, 257, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 257
    assert torch.allclose(model(x)[0, :-1], model(y)[0, :-1], atol=1e-6)


def test_lr_schedule():
    assert lr_factor(5, 100, 10, 0.1) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 100, 10, 0.1) < 1.0


def schedule_cfg(steps: int, warmup: int) -> Config:
    cfg = Config()
    cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio = steps, warmup, 0.1
    return cfg


def lrs_of(optimizer, scheduler, steps) -> list[list[float]]:
    """The lr of every group at each of ``steps`` steps, stepping as the loop does."""
    out = []
    for _ in steps:
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_schedule_is_a_lambda_lr_and_resumes_from_the_step():
    """The loop's schedule is a LambdaLR of the step (warm-up then cosine) over each group's own
    lr; built again at a resumed step, over groups whose lr the checkpoint overwrote, it goes on
    with exactly the uninterrupted sequence."""
    cfg = schedule_cfg(steps=10, warmup=3)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.02}])
    scheduler = lr_schedule(opt, cfg, [0.1, 0.02])
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    full = lrs_of(opt, scheduler, range(1, 11))
    expected = [[b * lr_factor(s, 10, 3, 0.1) for b in (0.1, 0.02)] for s in range(1, 11)]
    assert sum(full, []) == pytest.approx(sum(expected, []), rel=1e-12)
    # resumed after step 4: the groups hold whatever the checkpoint had (here: the last lr and
    # a stale initial_lr); the schedule is recomputed from the step and the configured lrs
    again = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.02}])
    for g in again.param_groups:
        g["lr"], g["initial_lr"] = 0.0123, 7.0
    resumed = lrs_of(again, lr_schedule(again, cfg, [0.1, 0.02], start=4), range(5, 11))
    assert resumed == full[4:]


def test_warmup_not_shorter_than_the_run_warns_once():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.warns(
        UserWarning, match=r"schedule\.warmup_steps=20 is not shorter than the run"
    ) as got:
        lr_schedule(opt, schedule_cfg(steps=8, warmup=20), [0.1])
    assert len(got) == 1 and "40% of optim.lr" in str(got[0].message)
    with pytest.warns(UserWarning, match=r"100% of optim\.lr at the last step and never decays"):
        lr_schedule(opt, schedule_cfg(steps=8, warmup=8), [0.1])  # warm-up = steps: no decay
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr_schedule(opt, schedule_cfg(steps=8, warmup=7), [0.1])
        lr_schedule(opt, schedule_cfg(steps=8, warmup=20), [0.1], warn=False)  # other ranks


# ------------------------------------------------------------------------------ optimizers


def routed_tiny_model():
    return route_params(tiny_model().named_parameters(), [])


def optim_cfg(name: str, grad_clip: float, **hyper):
    cfg = Config().optim
    cfg.name, cfg.grad_clip, cfg.hyper = name, grad_clip, hyper
    return cfg


@pytest.mark.parametrize("name", ["dolphinflow", "whiteflow", "factored_adam"])
def test_grad_clip_is_the_shardflow_optimizers_gradient_clipping(name):
    """optim.grad_clip reaches the optimizer (0 = off, not the optimizer's own default of 1.0)."""
    assert build_run_optimizer(optim_cfg(name, 0.5), routed_tiny_model()).gradient_clipping == 0.5
    assert build_run_optimizer(optim_cfg(name, 0), routed_tiny_model()).gradient_clipping is None
    with pytest.raises(
        ConfigError, match=r"optim\.hyper\.gradient_clipping=2\.0 is set.*grad_clip"
    ):
        build_run_optimizer(optim_cfg(name, 1.0, gradient_clipping=2.0), routed_tiny_model())


def test_adamw_gets_no_gradient_clipping_argument():
    opt = build_run_optimizer(optim_cfg("adamw", 0.5), routed_tiny_model())
    assert type(opt) is torch.optim.AdamW and "gradient_clipping" not in opt.defaults


def test_state_bytes_per_param_is_the_built_optimizers_own_figure():
    """ShardFlow optimizers measure their state (a method, called on the built optimizer);
    torch's AdamW has no such method: the table's 8 bytes."""
    groups = routed_tiny_model()
    plain = build_run_optimizer(optim_cfg("dolphinflow", 1.0, adaptive_lr=False), groups)
    assert state_bytes_per_param("dolphinflow", plain) == 4.0  # the table says 8
    factored = build_run_optimizer(optim_cfg("factored_adam", 1.0), groups)
    assert state_bytes_per_param("factored_adam", factored) == factored.state_bytes_per_param()
    adamw = build_run_optimizer(optim_cfg("adamw", 1.0), groups)
    assert state_bytes_per_param("adamw", adamw) == 8.0


BNB_FREE = """
import sys
import shardflow, shardflow.train
from shardflow.train.cli import main_train
assert "bitsandbytes" not in sys.modules, "import shardflow"
assert main_train(sys.argv[1:]) == 0
print("bitsandbytes loaded" if "bitsandbytes" in sys.modules else "bitsandbytes not loaded")
"""


def test_adamw_run_and_dry_run_do_not_import_bitsandbytes(tmp_path):
    """import shardflow / shardflow.train, a plain adamw run through the runtime's builder and its
    dry run leave bitsandbytes unimported (DolphinFlow8bit's registry entry imports it lazily)."""
    args = [
        str(ROOT / "configs" / "quickstart.toml"),
        *("--run.nproc", "1", "--placement.kind", "none", "--optim.name", "adamw"),
        *("--optim.groups", "[]"),  # the quickstart's groups set ortho_mode, which adamw lacks
        *("--run.out_dir", str(tmp_path), "--train.steps", "1", "--train.eval_every", "0"),
        *("--checkpoint.every", "0", "--checkpoint.save_model", "false", "--log.plot", "false"),
        *("--data.max_bytes", "100000"),
    ]
    for extra in ([], ["--dry-run"]):
        result = subprocess.run(
            [sys.executable, "-c", BNB_FREE, *args, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().endswith("bitsandbytes not loaded"), result.stdout[-2000:]


# ----------------------------------------------------------------------------------- data


def data_cfg(**kw):
    cfg = Config().data
    for key, value in dict(seq_len=16, **kw).items():
        setattr(cfg, key, value)
    return cfg


def test_embedded_corpus_split_is_deterministic():
    a = load_corpus(data_cfg(max_bytes=1_000_000, val_fraction=0.2), ByteTokenizer())
    b = load_corpus(data_cfg(max_bytes=1_000_000, val_fraction=0.2), ByteTokenizer())
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train_docs > 0 and a.val_docs > 0 and "standard library" in a.source


def test_text_folder_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"f{i}.txt").write_text(f"document number {i} " * 20)
    rows = [json.dumps({"text": f"record {i} " * 30}) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    cfg = data_cfg(paths=[str(tmp_path / "docs"), str(tmp_path / "d.jsonl")])
    corpus = load_corpus(cfg, ByteTokenizer())
    assert corpus.train_docs + corpus.val_docs == 60
    x, y = sample_batch(corpus.train, 16, 3, 0, "train", 1)
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_data_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.paths\[0\]='.*missing' does not exist"):
        load_corpus(data_cfg(paths=[str(tmp_path / "missing")]), ByteTokenizer())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(ConfigError, match=r"corpus .* is empty"):
        load_corpus(data_cfg(paths=[str(tmp_path / "empty")]), ByteTokenizer())
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1 has no string field data\.text_field"):
        load_corpus(data_cfg(paths=[str(tmp_path / "bad.jsonl")]), ByteTokenizer())


# ------------------------------------------------------------------------------ preflight


def test_preflight_errors(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.toml")
    with pytest.raises(ConfigError, match=r"run\.nproc=2 but 3 process\(es\) were launched"):
        preflight(cfg, ProcessInfo(rank=0, world=3, local_rank=0))
    cfg.run.nproc, cfg.placement.kind = 1, "none"
    cfg.optim.name = "dolphinflw"
    with pytest.raises(ConfigError, match=r"optim\.name='dolphinflw'.*Did you mean 'dolphinflow'"):
        preflight(cfg, ProcessInfo(0, 1, 0))


def test_hf_path_that_is_not_a_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    encoder = transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    encoder.save_pretrained(tmp_path / "bert")
    cfg = load_config(
        ROOT / "configs" / "quickstart.toml",
        ["--model.kind", "hf", "--model.path", str(tmp_path / "bert")],
    )
    cfg.run.nproc, cfg.placement.kind = 1, "none"
    with pytest.raises(ConfigError, match=r"holds a 'distilbert' model, which is not a causal"):
        preflight(cfg, ProcessInfo(0, 1, 0))
    cfg.model.path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"not a Hugging Face model directory"):
        preflight(cfg, ProcessInfo(0, 1, 0))


# ---------------------------------------------------------------------------- checkpoints


def test_resume_uses_newest_complete_checkpoint_and_makes_lazy_state(tmp_path):
    """keep=2 prunes, a torn checkpoint (no index) is ignored, and a fresh torch AdamW (whose
    state is made lazily) resumes with exactly the saved weights and moments."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (2, 4, 6):
        model(torch.randint(0, 257, (1, 4))).sum().backward()
        opt.step()
        ckpt.save_step(tmp_path, step, model=model, optimizer=opt, extra={"step": step}, keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    (tmp_path / "step_00000010").mkdir()  # torn: no index.json
    assert ckpt.latest(tmp_path).name == "step_00000006"
    fresh = tiny_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5e-4)
    with pytest.warns(UserWarning, match=r"param group 0 lr: checkpoint 0\.001 -> config 0\.0005"):
        assert ckpt.resume(tmp_path, model=fresh, optimizer=fresh_opt) == {"step": 6}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key
    assert fresh_opt.param_groups[0]["lr"] == 5e-4  # hyperparameters come from the config
    assert ckpt.resume(tmp_path / "none", model=fresh, optimizer=fresh_opt) is None


def test_materialize_state_leaves_weights_unchanged():
    model = tiny_model(tie_embeddings=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.materialize_state(opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all("exp_avg" in opt.state[p] for p in model.parameters())
    assert opt.param_groups[0]["lr"] == 1e-2


# -------------------------------------------------------------------------------- dry run


def test_llama3_8b_dry_run():
    cfg = load_config(ROOT / "configs" / "llama3-8b-fsdp8.toml")
    text = dry_run(cfg)
    assert re.search(r"8\.0\d\dB params", text)
    assert "8 rank(s)" in text and re.search(r"\n\s+7\s+28 ", text)  # rank 7: 28 NS units
    assert "memory per rank" in text and "owner plan over 8 ranks (FSDP2-aware" in text
    assert "max/mean: NS load 1.000" in text


def test_dry_run_prints_the_optimizers_measured_state_bytes(tmp_path):
    """The figure printed is the built optimizer's state_bytes_per_param(), not the table's."""
    base = [str(ROOT / "configs" / "quickstart.toml"), "--run.nproc", "1", "--placement.kind"]
    text = dry_run(load_config(base[0], [*base[1:], "none", "--optim.hyper.adaptive_lr", "false"]))
    assert "4 B/param of dolphinflow state" in text
    assert "owner plan: none (placement none runs one process)" in text
    text = dry_run(load_config(base[0], [*base[1:], "none", "--optim.name", "adamw"]))
    assert "8 B/param of adamw state" in text


def test_smollm2_offload_dry_run_from_shipped_shapes():
    pytest.importorskip("transformers")
    cfg = load_config(
        ROOT / "configs" / "smollm2-135m-offload.toml",
        ["--model.path", str(ROOT / "configs" / "hf" / "SmolLM2-135M")],
    )
    text = dry_run(cfg)
    assert "0.135B params (hf model, float32), placement=offload" in text
    device = re.search(r"device\s+weights\s+([\d.]+) GiB\s+grads\s+([\d.]+) GiB", text)
    host = re.search(r"host\s+master\s+([\d.]+) GiB.*optim state\s+([\d.]+) GiB", text)
    assert device and host, text
    assert float(device.group(1)) == pytest.approx(0.50, abs=0.01)  # 134.5M x 4 B
    assert float(host.group(2)) == pytest.approx(1.00, abs=0.01)  # DolphinFlow: 8 B/param


REF_START, REF_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_readme_config_reference_matches_dataclasses():
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if REF_START not in text:
        pytest.skip("README.md has no config reference section yet (markers missing)")
    inside = text.split(REF_START, 1)[1].split(REF_END, 1)[0]
    assert inside.strip() == config_reference().strip(), (
        "README config reference is stale: regenerate it with python -m shardflow.train.config"
    )
