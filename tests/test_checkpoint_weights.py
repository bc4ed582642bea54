"""Model weights export from FSDP2 shards: Hugging Face names, loadable by transformers, one
gathered tensor alive at a time.

A tiny Llama (transformers' ``LlamaForCausalLM``, built from a config: no download) is sharded
with ``fully_shard`` on 2 gloo ranks, trained one step with a ShardFlow optimizer, and exported
with ``save_model_weights`` beside its ``config.json``; ``AutoModelForCausalLM.from_pretrained``
loads the directory and gives exactly the trained (sharded) weights, under the same names
``LlamaForCausalLM`` has. While exporting, every rank records each gathered tensor's storage:
when the next one is gathered, at most one earlier one may still be alive (a reference can linger
for an instant in the writer thread's work item or the collective's bookkeeping), so the peak is
two full tensors whatever the model's size; keeping the model would count up to n − 1.
"""

from __future__ import annotations

import pytest
import torch
from dist import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

import shardflow.checkpoint as ck
from shardflow import DolphinFlow

transformers = pytest.importorskip("transformers")

VOCAB = 37


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def _tokens():
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))


def _train_step(model, opt, tokens):
    opt.zero_grad()
    model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    opt.step()


def _export(rank, world, directory):
    model = _llama()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = DolphinFlow(model.parameters(), lr=1e-2, process_group=mesh)
    _train_step(model, opt, _tokens()[rank::world])

    alive_at_gather: list[int] = []
    gathered: list[StorageWeakRef] = []
    full_tensor = DTensor.full_tensor

    def tracked(self, *args, **kwargs):
        alive_at_gather.append(sum(not ref.expired() for ref in gathered))
        out = full_tensor(self, *args, **kwargs)
        gathered.append(StorageWeakRef(out.untyped_storage()))
        return out

    DTensor.full_tensor = tracked
    try:
        ck.save_model_weights(directory / "model.safetensors", model)
    finally:
        DTensor.full_tensor = full_tensor
    if rank == 0:
        model.config.save_pretrained(directory)
    full = {n: p.full_tensor().tolist() for n, p in model.state_dict().items()}
    return alive_at_gather, full


def test_fsdp2_hugging_face_model_exports_weights_transformers_loads(tmp_path):
    results = run_on_ranks(_export, 2, tmp_path)
    n_params = len(list(_llama().parameters()))
    for alive, _ in results:
        assert len(alive) >= n_params  # every sharded tensor was gathered on every rank
        assert max(alive) <= 1  # ...one at a time

    trained = {n: torch.tensor(v) for n, v in results[0][1].items()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == _llama().state_dict().keys()  # Hugging Face names
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    reference = _llama()
    reference.load_state_dict(trained)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=_tokens()).logits, reference(input_ids=_tokens()).logits
        )
