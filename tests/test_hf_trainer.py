"""ShardFlow optimizers in Hugging Face's own loops (the README's "Hugging Face Trainer and
Accelerate" section): a tiny random ``LlamaForCausalLM`` built in code (no download) fine-tuned
by ``transformers.Trainer(optimizers=(DolphinFlow, scheduler))`` and by ``Accelerator``, with
``save_state``/``load_state``; param groups routed by the model's own parameter names. Skipped
without transformers or accelerate (the hf extra)."""

from __future__ import annotations

import re

import pytest
import torch

import shardflow

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 64, 16


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return transformers.LlamaForCausalLM(config)


def routed_groups(model) -> list[dict]:
    """Patterns written against the model's own names (``model.embed_tokens.weight``,
    ``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``, ...): embeddings, norms and
    the head element-wise, every other matrix orthogonalized."""
    elementwise = re.compile(r"^model\.embed_tokens|norm|^lm_head")
    named = list(model.named_parameters())
    rest = [p for n, p in named if not elementwise.search(n)]
    flat = [p for n, p in named if elementwise.search(n)]
    assert flat and rest and len(flat) + len(rest) == len(named)
    return [{"params": rest, "ortho_mode": "matrix"}, {"params": flat, "ortho_mode": None}]


def sequences(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed random sequences (a memorization task: the loss can fall fast)."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def test_trainer_with_dolphinflow_and_a_scheduler(tmp_path):
    model = tiny_llama()
    opt = shardflow.DolphinFlow(routed_groups(model), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=sequences(), optimizers=(opt, sched)
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    assert sched.last_epoch == 12  # Trainer stepped our scheduler with our optimizer


def test_accelerator_prepare_save_state_and_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    data = torch.stack([s["input_ids"] for s in sequences()])

    def prepared(seed: int):
        accelerator = accelerate.Accelerator(cpu=True)
        model = tiny_llama(seed)
        opt = shardflow.DolphinFlow(routed_groups(model), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return accelerator, *accelerator.prepare(model, opt, sched)

    def step(accelerator, model, opt, sched) -> float:
        loss = model(input_ids=data, labels=data).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.item()

    accelerator, model, opt, sched = prepared(0)
    losses = [step(accelerator, model, opt, sched) for _ in range(6)]
    assert losses[-1] < losses[0]
    accelerator.save_state(str(tmp_path / "state"))
    after_save = [step(accelerator, model, opt, sched) for _ in range(2)]

    accelerator2, model2, opt2, sched2 = prepared(1)  # other weights until load_state
    fresh = step(accelerator2, model2, opt2, sched2)
    accelerator2.load_state(str(tmp_path / "state"))
    resumed = [step(accelerator2, model2, opt2, sched2) for _ in range(2)]
    assert fresh != pytest.approx(after_save[0], rel=1e-3)
    # the first loss needs the saved weights, the second also the saved moments and step count
    assert resumed == pytest.approx(after_save, rel=1e-5)


def test_runtime_routes_a_hf_model_by_its_own_names():
    """``shardflow train`` wraps a Hugging Face model (CausalLM, ``inner``); its
    ``[[optim.groups]]`` patterns still see the model's own names."""
    from shardflow.train.config import GroupRule
    from shardflow.train.groups import own_names, route_params
    from shardflow.train.hf import CausalLM

    wrapped = CausalLM(tiny_llama())
    rules = [GroupRule(pattern=r"^model\.embed_tokens|^lm_head"), GroupRule(pattern=".*")]
    groups = route_params(own_names(wrapped), rules)
    assert groups[0].names == ["model.embed_tokens.weight", "lm_head.weight"]
    assert not any(n.startswith("inner.") for g in groups for n in g.names)
