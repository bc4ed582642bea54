"""Instruction and chat data (data.format = "instruct"): rendering, loss masks, packing with
example boundaries that the loss and the built-in decoder's attention respect, the dry run, a
run; and the shipped example's stated result (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_e2e import make_tiny_hf_model, one_process, tiny_config

from shardflow.train.cli import main_plan, main_train
from shardflow.train.config import ConfigError, DataConfig, ModelConfig
from shardflow.train.data import ByteTokenizer, draw_batch, load_corpus
from shardflow.train.instruct import (
    IGNORE,
    example_text,
    pack,
    read_records,
    render,
    stdlib_signatures,
)
from shardflow.train.metrics import read_metrics
from shardflow.train.model import build_decoder

ROOT = Path(__file__).resolve().parent.parent
BYTES = ByteTokenizer()

RECORDS = [
    {"prompt": "math: Return the square root of x.\n", "completion": "def sqrt(x):"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]


def loss_text(record: dict, tokenizer=BYTES) -> str:
    ids, loss = render(record, tokenizer)
    return tokenizer.decode([int(i) for i, c in zip(ids, loss) if c])


def test_prompt_completion_carries_loss_on_the_completion_and_eos_only():
    ids, loss = render(RECORDS[0], BYTES)
    prompt = len(RECORDS[0]["prompt"].encode())
    assert not loss[:prompt].any() and loss[prompt:].all()
    assert ids[-1] == BYTES.eos_id and loss_text(RECORDS[0]) == "def sqrt(x):"


def test_byte_chat_template_marks_each_assistant_answer():
    assert example_text(RECORDS[1], BYTES) == (
        "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n[[4<eos>]]"
        "<|user|>\nand 3+3?\n<|assistant|>\n[[6<eos>]]"
    )
    assert loss_text(RECORDS[1]) == "46"


def test_packing_keeps_examples_whole_and_the_loss_inside_answers():
    examples = [render(r, BYTES) for r in RECORDS * 3]
    lengths = [len(ids) for ids, _ in examples]
    packed = pack(examples, seq_len=128, pad=BYTES.eos_id)
    assert packed.examples == 6 and packed.tokens == sum(lengths)
    answers = sum(int(loss.sum()) for _, loss in examples)
    assert packed.loss_tokens == answers  # every answer token is a target, nothing else
    for row in range(len(packed.inputs)):
        docs, targets = packed.docs[row], packed.targets[row]
        # a target carries loss only where it continues the same example as its input
        for j in range(len(targets) - 1):
            if targets[j] != IGNORE:
                assert docs[j] >= 0 and docs[j + 1] in (docs[j], -1)
        starts = [0] + [j for j in range(1, len(docs)) if docs[j] != docs[j - 1]]
        for s in starts[1:]:
            assert targets[s - 1] == IGNORE  # the first token of an example is never a target
    # rows hold whole examples in order: each row's example indices count up from 0
    for docs in packed.docs:
        real = docs[docs >= 0]
        assert real[0] == 0 and bool((real.diff() >= 0).all()) and bool((real.diff() <= 1).all())


def test_a_long_example_is_cut_and_one_without_answer_left_is_dropped():
    long_prompt = {"prompt": "x" * 300, "completion": "y"}
    cfg = DataConfig(format="instruct", seq_len=64)
    from shardflow.train.instruct import tokenize

    kept, cut, dropped = tokenize([("a", long_prompt), ("b", RECORDS[0])], BYTES, cfg.seq_len)
    assert (cut, dropped, len(kept)) == (1, 1, 1)


def test_attention_stays_inside_each_packed_example():
    """The decoder's output for the second example in a packed row equals its output alone."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = build_decoder(cfg)
    model.reset_parameters(0)
    a, b = render(RECORDS[0], BYTES)[0], render(RECORDS[1], BYTES)[0][:20]
    row = torch.from_numpy(list_concat(a, b))[None]
    docs = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        packed = model(row, docs)[0, len(a) :]
        alone = model(torch.from_numpy(b)[None])[0]
        leaky = model(row)[0, len(a) :]  # without docs: causal over the whole row
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert (leaky - alone).abs().max() > 1e-2


def list_concat(*arrays):
    import numpy as np

    return np.concatenate(arrays)


def test_bad_records_name_the_line_and_the_forms(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: an instruction record needs"):
        read_records(DataConfig(format="instruct", paths=[str(path)]))
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: no assistant message"):
        read_records(DataConfig(format="instruct", paths=[str(path)]))


def test_stdlib_set_is_docstring_to_signature():
    records = stdlib_signatures(20_000)
    assert len(records) > 100
    assert all(
        r["completion"].startswith("def ") and r["completion"].endswith(":") for _, r in records
    )
    assert all(": " in r["prompt"] and r["prompt"].endswith("\n") for _, r in records)
    assert not any("test" in key.split(":")[0] for key, _ in records)


def test_hf_chat_template_marks_assistant_turns(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_tiny_hf_model(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(tmp_path / "hf")
    from shardflow.train.hf import HFTokenizer

    hf = HFTokenizer(str(tmp_path / "hf"))
    ids, loss = render(RECORDS[1], hf)
    answers = hf.inner.decode([int(i) for i, c in zip(ids, loss) if c])
    assert answers.replace(" ", "") == "4</s>6</s>"  # each answer and its end-of-turn token
    assert hf.inner.decode(ids.tolist()).replace(" ", "").startswith("<system>Bebrief.</s>")


def write_records(path: Path, n: int) -> Path:
    """``n`` prompt/completion records: a word and its reverse."""
    words = [f"w{i:03d}{'abcdefgh'[i % 8]}" for i in range(n)]
    path.write_text(
        "".join(
            json.dumps({"prompt": f"reverse {w}: ", "completion": w[::-1]}) + "\n" for w in words
        )
    )
    return path


def test_plan_prints_examples_tokens_and_the_share_with_loss(tmp_path, capsys):
    data = write_records(tmp_path / "rev.jsonl", 60)
    config = tiny_config(tmp_path)
    args = [*one_process(config), "--data.format", "instruct", "--data.paths", str(data)]
    assert main_plan(args) == 0
    out = capsys.readouterr().out
    assert "instruction data:" in out and "carry loss" in out and "[[" in out


def test_instruct_run_learns_the_answers(tmp_path):
    data = write_records(tmp_path / "rev.jsonl", 200)
    config = tiny_config(tmp_path)
    args = [*one_process(config), "--data.format", "instruct", "--data.paths", str(data)]
    args += ["--train.steps", "16", "--train.eval_every", "8", "--log.plot", "false"]
    args += ["--checkpoint.every", "0", "--checkpoint.save_model", "false"]
    assert main_train(args) == 0
    vals = [
        r["val_loss"] for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "val_loss" in r
    ]
    assert vals[-1] < 0.8 * vals[0], vals


def test_draw_batch_targets_ignore_prompts(tmp_path):
    data = write_records(tmp_path / "rev.jsonl", 50)
    cfg = DataConfig(format="instruct", paths=[str(data)], seq_len=32, val_fraction=0.2)
    corpus = load_corpus(cfg, BYTES)
    batch = draw_batch(corpus.train, 32, 4, 0, "train", 1)
    assert batch.inputs.shape == batch.targets.shape == batch.docs.shape == (4, 32)
    answers = BYTES.decode([int(t) for t in batch.targets.flatten() if t != IGNORE])
    assert "reverse" not in answers and answers  # prompts never carry loss


INSTRUCT = ROOT / "configs" / "instruct-stdlib.toml"

MIN_VAL_DROP = 0.30
"""The shipped instruction example: validation loss on the held-out answers falls at least this
share from step 0 (issue 19's target). Measured: bench/results/instruct-stdlib-cpu2-2026-12-07.md."""


@pytest.mark.slow
def test_shipped_instruct_example_val_loss_falls_30_percent(tmp_path):
    out = tmp_path / "instruct"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "shardflow.cli", "train", str(INSTRUCT), "--run.out_dir", str(out)]
    cmd += ["--log.progress", "false", "--checkpoint.every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "carry loss" in result.stderr
    vals = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    print(f"instruct example: val loss {vals[0]:.3f} -> {vals[-1]:.3f}")
    assert vals[-1] <= (1 - MIN_VAL_DROP) * vals[0]
