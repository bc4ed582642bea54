"""Checkpoints in one process: round trip, exact resume for every optimizer, refusals, the format."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from optim_table import case_id, cases, skip_reason
from safetensors.torch import load_file
from test_checkpoint_kinds import KindsOpt

import shardflow.checkpoint as ck
from shardflow import DolphinFlow
from shardflow.checkpoint._format import INDEX_HASH_KEY, index_digest


def _model(seed=0, hidden=10):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 5, bias=False)
    )


def _train(model, opt, steps, start=0):
    """Steps ``start+1 .. start+steps``, each on its own batch (so resuming must line them up)."""
    for step in range(start + 1, start + steps + 1):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


RESUME_CASES = [*cases(), *[(None, c) for c in ({"lr": 1e-2}, {"lr": 1e-2, "block": 4})]]


def _factory(record):
    return KindsOpt if record is None else record.factory


@pytest.mark.parametrize(
    "case", RESUME_CASES, ids=lambda c: "KindsOpt" if c[0] is None else case_id(c)
)
def test_resume_is_bitwise_exact(case, tmp_path):
    """N steps, save, load into a fresh model and optimizer, M steps == N+M uninterrupted."""
    record, config = case
    if record is not None and skip_reason(record):
        pytest.skip(skip_reason(record))
    factory = _factory(record)
    reference = _model()
    ref_opt = factory(reference.parameters(), **config)
    _train(reference, ref_opt, 7)

    model = _model()
    opt = factory(model.parameters(), **config)
    _train(model, opt, 4)
    path = ck.save(ck.step_path(tmp_path, 4), model=model, optimizer=opt, extra={"step": 4})

    resumed = _model(seed=1)
    resumed_opt = factory(resumed.parameters(), **config)
    extra = ck.load(path, model=resumed, optimizer=resumed_opt)
    assert extra == {"step": 4}
    _assert_same(model, opt, resumed, resumed_opt)
    _train(resumed, resumed_opt, 3, start=4)
    _assert_same(reference, ref_opt, resumed, resumed_opt)


def test_hyperparameters_counters_and_dtypes_are_restored(tmp_path):
    model = _model().to(torch.bfloat16)
    opt = DolphinFlow(
        model.parameters(), lr=3e-3, momentum_bounds=(0.6, 0.9), ns_dtype=torch.float32
    )
    opt.param_groups[0]["lr_scale"] = 0.25
    opt.nonfinite_steps = 2
    for p in model.parameters():
        opt.state[p]["step"].fill_(300.0)  # bf16 would round it to 300 → 300 but 301 → 300
        opt.state[p]["step"] += 1
    path = ck.save(tmp_path / "ck", model=model, optimizer=opt)
    fresh = _model().to(torch.bfloat16)
    fresh_opt = DolphinFlow(fresh.parameters(), lr=1.0)
    ck.load(path, model=fresh, optimizer=fresh_opt)
    group = fresh_opt.param_groups[0]
    assert group["lr"] == 3e-3 and group["lr_scale"] == 0.25
    assert group["momentum_bounds"] == (0.6, 0.9) and group["ns_dtype"] is torch.float32
    assert fresh_opt.nonfinite_steps == 2
    for p in fresh.parameters():
        assert fresh_opt.state[p]["step"].dtype == torch.float32
        assert fresh_opt.state[p]["step"].item() == 301.0
        assert fresh_opt.state[p]["exp_avg"].dtype == torch.float32
    index = ck.read_index(path)
    assert index["optimizer"]["step"] == 301 and index["version"] == ck.FORMAT_VERSION


def test_files_are_plain_safetensors_and_index_records_slices(tmp_path):
    model = _model()
    opt = KindsOpt(model.parameters())
    _train(model, opt, 2)
    path = ck.save(tmp_path / "ck", model=model, optimizer=opt)
    index = json.loads((path / "index.json").read_text())
    (name,) = index["files"]
    tensors = load_file(str(path / name))
    w = tensors["model/0.weight"]
    assert torch.equal(w, model[0].weight.detach())
    sign = index["tensors"]["optim/0.weight/sign"]
    assert sign == {
        "shape": [10, 1],
        "dtype": "uint8",
        "layout": "rows",
        "pieces": [[name, 0, 10]],
    }
    assert index["tensors"]["optim/0.weight/seed"]["layout"] == "replicated"
    assert index["optimizer"]["state"]["0.weight"]["refresh"] == {"value": 0}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = _model()
    opt = KindsOpt(model.parameters())
    path = ck.save(tmp_path / "ck", model=model, optimizer=opt)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle")

    for target in (pickle, torch.serialization):
        for fn in ("load", "loads"):
            if hasattr(target, fn):
                monkeypatch.setattr(target, fn, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = _model(seed=4)
    fresh_opt = KindsOpt(fresh.parameters())
    ck.load(path, model=fresh, optimizer=fresh_opt)
    _assert_same(model, opt, fresh, fresh_opt)


def test_keep_last_k_and_latest(tmp_path):
    model = _model()
    opt = DolphinFlow(model.parameters())
    assert ck.latest(tmp_path) is None
    for step in (10, 20, 30, 40):
        ck.save(ck.step_path(tmp_path, step), model=model, optimizer=opt, keep=2)
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert ck.latest(tmp_path) == ck.step_path(tmp_path, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]
    # Saving an older step again never deletes the one just written, and overwrites cleanly.
    ck.save(ck.step_path(tmp_path, 40), model=model, optimizer=opt, keep=2)
    assert ck.latest(tmp_path) == ck.step_path(tmp_path, 40)


def test_model_only_and_optimizer_only(tmp_path):
    model = _model()
    opt = DolphinFlow(model.named_parameters(), lr=1e-2)
    _train(model, opt, 2)
    ck.save(tmp_path / "m", model=model)
    ck.save(tmp_path / "o", optimizer=opt)
    fresh = _model(seed=3)
    ck.load(tmp_path / "m", model=fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    fresh_opt = DolphinFlow(fresh.named_parameters())  # named: state keyed by the same names
    ck.load(tmp_path / "o", optimizer=fresh_opt)
    _assert_same(model, opt, fresh, fresh_opt)
    with pytest.raises(ck.CheckpointError, match=r"holds no optimizer state"):
        ck.load(tmp_path / "m", optimizer=fresh_opt)


def test_wrapper_prefixes_do_not_change_names(tmp_path):
    model = _model()
    opt = DolphinFlow(model.parameters())
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like: names start with "module."
    ck.save(tmp_path / "ck", model=wrapped, optimizer=opt)
    fresh = _model(seed=2)
    ck.load(tmp_path / "ck", model=fresh, optimizer=DolphinFlow(fresh.parameters()))
    assert torch.equal(fresh[2].weight, model[2].weight)


# -- refusals -------------------------------------------------------------------------------------


def _saved(tmp_path):
    model = _model()
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    return ck.save(tmp_path / "ck", model=model, optimizer=opt)


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        [dict(g, params=None) for g in opt.param_groups],
    )


def _refused(path, model, opt, pattern):
    before = _snapshot(model, opt)
    with pytest.raises(ck.CheckpointError, match=pattern):
        ck.load(path, model=model, optimizer=opt)
    after = _snapshot(model, opt)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)  # nothing partly loaded
    for sa, sb in zip(before[1], after[1]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert before[2] == after[2]


def _fresh(**kw):
    model = _model(seed=5, **kw)
    return model, DolphinFlow(model.parameters(), lr=0.5)


def test_refuses_a_corrupted_file(tmp_path):
    path = _saved(tmp_path)
    file = path / "rank-00000-of-00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte inside the last tensor
    file.write_bytes(bytes(data))
    _refused(path, *_fresh(), r"rank-00000-of-00001\.safetensors' is corrupted: its SHA-256")


def test_refuses_a_truncated_file(tmp_path):
    path = _saved(tmp_path)
    file = path / "rank-00000-of-00001.safetensors"
    file.write_bytes(file.read_bytes()[:-16])
    _refused(path, *_fresh(), r"rank-00000-of-00001\.safetensors' is truncated: \d+ bytes")


def test_refuses_a_missing_rank_file(tmp_path):
    path = _saved(tmp_path)
    (path / "rank-00000-of-00001.safetensors").unlink()
    _refused(path, *_fresh(), r"rank-00000-of-00001\.safetensors' is missing")


def test_refuses_another_model(tmp_path):
    path = _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 5, bias=False))
    _refused(
        path, other, DolphinFlow(other.parameters()), r"different model: missing \['1\.weight'\]"
    )


def test_refuses_changed_shapes(tmp_path):
    path = _saved(tmp_path)
    _refused(
        path,
        *_fresh(hidden=12),
        r"model/0\.weight has shape \[10, 6\] in the checkpoint but \[12, 6\]",
    )


def test_refuses_changed_dtypes(tmp_path):
    path = _saved(tmp_path)
    model = _model(seed=5).double()
    _refused(
        path,
        model,
        DolphinFlow(model.parameters()),
        r"0\.weight has dtype float32 in the checkpoint but float64",
    )


def test_refuses_changed_optimizer_state(tmp_path):
    path = _saved(tmp_path)
    model = _model(seed=5)
    opt = DolphinFlow(model.parameters(), adaptive_lr=False)  # no exp_avg_sq
    _refused(
        path, model, opt, r"different state of 0\.weight: missing \[\], unexpected \['exp_avg_sq'\]"
    )


def _rewrite_index(path, edit, rehash=True):
    """Apply ``edit`` to the index; with ``rehash``, as a tool that keeps its hash consistent
    would (so the checks behind the hash are reached)."""
    index = json.loads((path / "index.json").read_text())
    edit(index)
    if rehash:
        index[INDEX_HASH_KEY] = index_digest(index)
    (path / "index.json").write_text(json.dumps(index))


def test_refuses_a_newer_format(tmp_path):
    path = _saved(tmp_path)
    _rewrite_index(path, lambda index: index.update(version=ck.FORMAT_VERSION + 1))
    newer = ck.FORMAT_VERSION + 1
    _refused(path, *_fresh(), rf"index\.json' has format version {newer}, newer than this")


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda index: index.update(version=0), r"format version 0, which never existed"),
        (lambda index: index.update(version="1"), r"format version '1', a str: ShardFlow writes"),
        (lambda index: index.pop("version"), r"has no format version: every ShardFlow index"),
    ],
    ids=["zero", "string", "missing"],
)
def test_each_wrong_version_has_its_own_message(tmp_path, edit, pattern):
    path = _saved(tmp_path)
    _rewrite_index(path, edit)
    _refused(path, *_fresh(), pattern)


def test_an_edited_index_is_refused(tmp_path):
    path = _saved(tmp_path)
    _rewrite_index(path, lambda i: i["optimizer"]["param_groups"][0].update(lr=1.0), rehash=False)
    _refused(path, *_fresh(), r"index\.json' was changed after it was written.*config")
    _rewrite_index(path, lambda index: index.pop(INDEX_HASH_KEY), rehash=False)
    _refused(path, *_fresh(), r"index\.json' lacks its content hash after it was written")


def test_a_version_1_index_without_a_hash_still_loads(tmp_path):
    path = _saved(tmp_path)
    _rewrite_index(path, lambda index: index.update(version=1), rehash=False)
    _rewrite_index(path, lambda index: index.pop(INDEX_HASH_KEY), rehash=False)
    model, opt = _fresh()
    ck.load(path, model=model, optimizer=opt)
    assert opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("beta2", 1.5, r"beta2=1\.5 is invalid: pass a number in \[0, 1\)"),
        ("eps", -1, r"eps=-1 is invalid: pass a finite number >= 0"),
        ("ortho_mode", "bogus", r"ortho_mode='bogus' is invalid: choose one of"),
        ("lr", "fast", r"lr='fast' is invalid: pass a learning rate"),
    ],
)
def test_loaded_hyperparameters_pass_the_constructors_checks(tmp_path, key, value, pattern):
    path = _saved(tmp_path)
    _rewrite_index(path, lambda i: i["optimizer"]["param_groups"][0].update({key: value}))
    _refused(
        path,
        *_fresh(),
        r"param group 0 holds a value DolphinFlow's constructor refuses: " + pattern,
    )


def test_torch_optimizers_hyperparameters_are_checked_by_their_constructor(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    path = ck.save(tmp_path / "ck", model=model, optimizer=opt)
    _rewrite_index(path, lambda i: i["optimizer"]["param_groups"][0].update(eps=-1.0))
    fresh = _model(seed=5)
    _refused(path, fresh, torch.optim.AdamW(fresh.parameters()), r"Invalid epsilon value: -1\.0")


def test_index_file_names_stay_inside_the_checkpoint(tmp_path):
    path = _saved(tmp_path)
    name = "rank-00000-of-00001.safetensors"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes((path / name).read_bytes())

    def elsewhere(index):
        index["files"]["../outside/x.safetensors"] = index["files"].pop(name)
        for record in index["tensors"].values():
            for piece in record["pieces"]:
                piece[0] = "../outside/x.safetensors"

    _rewrite_index(path, elsewhere)
    _refused(path, *_fresh(), r"lists the file '\.\./outside/x\.safetensors', which is not a plain")


def test_refuses_an_incomplete_or_garbled_index(tmp_path):
    path = _saved(tmp_path)
    (path / "index.json").write_text('{"format": "shardflow-checkpoint", "vers')
    _refused(path, *_fresh(), r"index\.json' is not valid JSON")
    (path / "index.json").unlink()
    _refused(path, *_fresh(), r"index\.json' is missing: .* is not a complete checkpoint")


def test_refuses_a_header_that_disagrees_with_the_index(tmp_path):
    path = _saved(tmp_path)

    def elsewhere(index):
        index["tensors"]["model/0.weight"]["pieces"][0][0] = "elsewhere.safetensors"

    _rewrite_index(path, elsewhere)
    _refused(
        path, *_fresh(), r"model/0\.weight is stored in 'elsewhere\.safetensors', which the index"
    )


# -- bad arguments --------------------------------------------------------------------------------


def test_bad_arguments_are_named(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match=r"keep=0 is invalid: pass an integer >= 1"):
        ck.save(ck.step_path(tmp_path, 1), model=model, keep=0)
    with pytest.raises(ValueError, match=r"keep=2 needs step-numbered checkpoints.*step_path"):
        ck.save(tmp_path / "final", model=model, keep=2)
    with pytest.raises(ValueError, match=r"save\(\) needs model=, optimizer= or both"):
        ck.save(tmp_path / "x")
    with pytest.raises(ck.CheckpointError, match=r"extra holds a set, which a checkpoint cannot"):
        ck.save(tmp_path / "x", model=model, extra={"ids": {1, 2}})
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"dtype=torch\.int8 is invalid: pass a floating"):
        ck.save_model_weights(tmp_path / "w.safetensors", model, dtype=torch.int8)


def test_an_undeclared_state_key_is_refused(tmp_path):
    model = _model()
    opt = DolphinFlow(model.parameters())
    opt.state[model[0].weight]["surprise"] = torch.zeros(3)
    with pytest.raises(
        ck.CheckpointError, match=r"DolphinFlow\.state_layout does not declare state key 'surprise'"
    ):
        ck.save(tmp_path / "ck", optimizer=opt, model=model)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


# -- model weights for other tools ---------------------------------------------------------------


def test_model_weights_load_in_plain_safetensors(tmp_path):
    model = _model()
    wrapped = torch.nn.Module()
    wrapped.module = model
    path = ck.save_model_weights(tmp_path / "model.safetensors", wrapped)
    loaded = load_file(str(path))
    assert loaded.keys() == model.state_dict().keys()
    fresh = _model(seed=9)
    fresh.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    half = load_file(
        str(ck.save_model_weights(tmp_path / "half.safetensors", model, dtype=torch.bfloat16))
    )
    assert half["0.weight"].dtype == torch.bfloat16
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_a_garbled_header_is_refused_even_without_checksums(tmp_path):
    path = _saved(tmp_path)
    file = path / "rank-00000-of-00001.safetensors"
    data = bytearray(file.read_bytes())
    data[8:10] = b"[x"  # the JSON header now starts with garbage; the size is unchanged
    file.write_bytes(bytes(data))
    model, opt = _fresh()
    with pytest.raises(
        ck.CheckpointError, match=r"rank-00000-of-00001\.safetensors' has a malformed header"
    ):
        ck.load(path, model=model, optimizer=opt, verify=False)
