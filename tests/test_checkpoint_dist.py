"""Checkpoints across real processes (gloo, CPU): FSDP2 shards and DDP replicas, resharded.

One scenario per test, each a few ``run_on_ranks`` calls (process start-up dominates the time):

- FSDP2 (``fully_shard``, uneven and empty shards at W=4) with a torch optimizer whose state is
  DTensors: 3 steps at W=2, save; resume at W=2 (bitwise equal to the uninterrupted run), at W=4
  and in a plain single process (equal to the single-process reference within the sharding
  tolerance); the W=4 run saves again and W=2 resumes from it (4→2); model weights exported from
  the shards load with plain safetensors.
- DDP-replicated training (a DDP-wrapped model, a ShardFlow optimizer per rank): identical copies
  are written once, shared out between the ranks' files; a single process resumes from it.
"""

from __future__ import annotations

import torch
from dist import run_on_ranks
from safetensors.torch import load_file

import shardflow.checkpoint as ck
from shardflow import DolphinFlow

BATCH = 8
# Reduce-scatter sums the ranks' gradients in another order than one process does; Adam's
# normalisation turns those last-bit differences into relative ones of the same size.
TOL = dict(rtol=1e-5, atol=1e-6)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def _train(model, opt, steps: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
    """Each rank takes its slice of the step's batch (FSDP2 averages the gradients)."""
    for step in range(start + 1, start + steps + 1):
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world]).backward()
        opt.step()


def _full(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _portable(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Tensors as lists to return from a rank (exact for fp32; no shared-memory handles)."""
    return {n: t.tolist() for n, t in tensors.items()}


def _tensors(lists: dict[str, list]) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, dtype=torch.float32) for n, v in lists.items()}


def _fsdp_model(world: int):
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _fsdp_run(rank, world, load_from, save_to, steps, start, weights_to=None):
    model = _fsdp_model(world)
    opt = _adamw(model.parameters())
    if load_from is not None:
        _train(model, opt, 1, start=10_000, rank=rank, world=world)  # state must exist to load into
        assert ck.load(load_from, model=model, optimizer=opt) == {"step": start}
    _train(model, opt, steps, start=start, rank=rank, world=world)
    if save_to is not None:
        ck.save(save_to, model=model, optimizer=opt, extra={"step": start + steps})
    if weights_to is not None:
        ck.save_model_weights(weights_to, model)
    return _portable(_full(model))


def test_fsdp2_state_reshards_2_to_4_to_2_and_to_one_process(tmp_path):
    reference = _model()
    ref_opt = _adamw(reference.parameters())
    _train(reference, ref_opt, 7)
    expected = _full(reference)

    a, b = tmp_path / "a", tmp_path / "b"
    uninterrupted = _tensors(run_on_ranks(_fsdp_run, 2, None, None, 5, 0)[0])
    run_on_ranks(_fsdp_run, 2, None, a, 3, 0)
    resumed_same_w = _tensors(run_on_ranks(_fsdp_run, 2, a, None, 2, 3)[0])
    for name in expected:  # same world size: bitwise
        assert torch.equal(resumed_same_w[name], uninterrupted[name]), name

    weights = tmp_path / "model.safetensors"
    at_four = _tensors(run_on_ranks(_fsdp_run, 4, a, b, 2, 3, weights)[0])  # 2 → 4, then saves at 4
    five = _model()
    five_opt = _adamw(five.parameters())
    _train(five, five_opt, 5)
    for name, value in _full(five).items():
        torch.testing.assert_close(at_four[name], value, **TOL)
        torch.testing.assert_close(uninterrupted[name], value, **TOL)
    exported = load_file(str(weights))
    assert exported.keys() == set(expected)
    assert all(torch.equal(exported[n], at_four[n]) for n in exported)

    back_to_two = _tensors(run_on_ranks(_fsdp_run, 2, b, None, 2, 5)[0])  # 4 → 2
    one = _model()  # and a plain single process from the W=4 checkpoint
    one_opt = _adamw(one.parameters())
    _train(one, one_opt, 1, start=10_000)
    ck.load(b, model=one, optimizer=one_opt)
    _train(one, one_opt, 2, start=5)
    for name, value in expected.items():
        torch.testing.assert_close(back_to_two[name], value, **TOL)
        torch.testing.assert_close(_full(one)[name], value, **TOL)
    index = ck.read_index(b)
    assert index["world_size"] == 4
    pieces = index["tensors"]["optim/2.weight/exp_avg"]["pieces"]
    assert [p[1:] for p in pieces] == [[0, 1], [1, 2], [2, 3]]  # rank 3's shard is empty


def _ddp_run(rank, world, path):
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = DolphinFlow(model.parameters(), lr=1e-2)
    _train(ddp, opt, 3, rank=rank, world=world)
    ck.save(path, model=ddp, optimizer=opt, extra={"step": 3})
    _train(ddp, opt, 2, start=3, rank=rank, world=world)
    return _portable(_full(model))


def test_ddp_replicas_are_written_once_and_resume_in_one_process(tmp_path):
    path = tmp_path / "ck"
    finished = _tensors(run_on_ranks(_ddp_run, 2, path)[0])
    index = ck.read_index(path)
    writers = {p[0] for r in index["tensors"].values() for p in r["pieces"]}
    assert len(writers) == 2  # both ranks wrote a share of the identical copies
    assert all(len(r["pieces"]) == 1 for r in index["tensors"].values())  # each copy once
    model = _model()
    opt = DolphinFlow(model.parameters(), lr=0.5)
    assert ck.load(path, model=model, optimizer=opt) == {"step": 3}
    _train(model, opt, 2, start=3)
    for name, value in _full(model).items():
        torch.testing.assert_close(value, finished[name], **TOL)
