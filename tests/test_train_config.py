"""Run configs, routing, data, model, schedule, checkpoints and dry runs (in-process, fast)."""

from __future__ import annotations

import dataclasses
import json
import re
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
from shardflow.train.loop import lr_factor, preflight
from shardflow.train.model import build_decoder
from shardflow.train.placement import ProcessInfo
from shardflow.train.plan import dry_run, owner_plan

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
    assert ckpt.resume(tmp_path, model=fresh, optimizer=fresh_opt) == {"step": 6}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key
    assert fresh_opt.param_groups[0]["lr"] == 1e-3  # hyperparameters come from the checkpoint
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
    assert "8 rank(s)" in text and "rank 7" in text
    assert "memory per rank" in text and "Newton-Schulz owner ranks" in text


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


def test_owner_plan_is_balanced():
    owners = owner_plan([(64, 64)] * 8 + [(128, 128)] * 2, 2)
    costs = [0, 0]
    for (m, n), o in zip([(64, 64)] * 8 + [(128, 128)] * 2, owners):
        costs[o] += m * n * min(m, n)
    assert costs[0] == costs[1]


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
