"""Placement "offload": one accelerator holds weights and gradients; the host holds the optimizer.

The split (the idea of ZeRO-Offload, Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale
Model Training", here in its simplest form: no overlap of the CPU update with the backward pass):

- the device model: the weights in ``model.dtype`` and their gradients (plus activations);
- the host: a float32 **master copy** of every parameter, a gradient buffer per parameter and
  the optimizer with all its state, pinned when CUDA is available (fast, asynchronous copies).

One step, after the backward pass and gradient clipping on the device:

1. every gradient is copied device → host into its pinned buffer (``non_blocking``), then one
   synchronisation;
2. ``optimizer.step()`` runs on the host, on the master weights;
3. every master weight is copied host → device (``non_blocking``, cast to the model's dtype);
   work queued later on the device's stream sees the new weights.

Device memory per parameter: weights + gradients (8 B in float32, 4 B in bfloat16) instead of
that plus the optimizer state (8 B for AdamW or DolphinFlow). Host memory: 4 B master + 4 B
gradient buffer + the state. The master copy and the optimizer are an ordinary module and
optimizer, so a checkpoint of an offloaded run is the same as a one-process run's (float32
weights and the optimizer state) and resumes under any placement.

On a machine without CUDA the "device" is the CPU too: the same copies happen between two CPU
copies, which gives the same results as placement "none" (what the tests check).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _pin(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return t.pin_memory() if pin else t


def master_copy(model: nn.Module, pin: bool) -> nn.Module:
    """A float32 copy of ``model`` (on the CPU, not yet moved) with pinned storage when ``pin``."""
    master = copy.deepcopy(model).float()
    with torch.no_grad():
        for p in master.parameters():
            p.data = _pin(p.data.contiguous(), pin)
            p.grad = _pin(torch.zeros_like(p.data), pin)
    return master


class OffloadOptimizer:
    """The host-side optimizer of a device model, behind the optimizer calls the loop makes.

    Args:
        model: the model on the device (its parameters get gradients from the backward pass).
        master: :func:`master_copy` of the model before it moved (same parameter order).
        optimizer: any optimizer over ``master``'s parameters (built on the host).
    """

    def __init__(self, model: nn.Module, master: nn.Module, optimizer: Any) -> None:
        self.model = model
        self.master = master
        self.optimizer = optimizer
        self.pairs = list(zip(model.parameters(), master.parameters()))
        self.buffers = {id(m): m.grad for _, m in self.pairs}
        for dev, host in self.pairs:
            if dev.shape != host.shape:
                raise ValueError(
                    f"master parameter of shape {tuple(host.shape)} pairs with device parameter "
                    f"{tuple(dev.shape)}: build the master copy from the same model."
                )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def _sync(self) -> None:
        device = self.pairs[0][0].device if self.pairs else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pull_grads(self) -> None:
        """Device gradients → host buffers (a parameter without a gradient gets none)."""
        with torch.no_grad():
            for dev, host in self.pairs:
                if dev.grad is None:
                    host.grad = None
                    continue
                buffer = self.buffers[id(host)]
                buffer.copy_(dev.grad, non_blocking=True)
                host.grad = buffer
        self._sync()

    def push_weights(self) -> None:
        """Host master weights → device weights (cast to the device model's dtype)."""
        with torch.no_grad():
            for dev, host in self.pairs:
                dev.copy_(host, non_blocking=True)

    def step(self) -> None:
        """Gradients down, the optimizer's update on the host, weights up."""
        self.pull_grads()
        self.optimizer.step()
        self.push_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the device gradients (the host buffers are overwritten by the next step)."""
        self.model.zero_grad(set_to_none=set_to_none)

    def host_bytes(self) -> int:
        """Bytes held on the host: master weights, gradient buffers and optimizer state."""
        total = sum(2 * h.numel() * h.element_size() for _, h in self.pairs)
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total
