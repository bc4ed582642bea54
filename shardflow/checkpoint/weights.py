"""Model weights as one plain safetensors file that other tools load.

``save_model_weights(path, model)`` writes ``model.state_dict()`` under its own names (a Hugging
Face model's names are its ``state_dict`` names; wrapper prefixes such as DDP's ``module.`` are
removed) with ``{"format": "pt"}`` metadata, which ``transformers`` expects. Sharded parameters
(FSDP2 DTensors) are gathered **one tensor at a time** — ``full_tensor()`` of one parameter,
written, freed — so no rank ever holds the whole model beyond its own shard plus one parameter.
Rank 0 writes; the file appears atomically (temporary name, fsync, rename). Tied weights are
written under each of their names. ``safetensors.torch.load_file(path)`` reads the result.

**Hugging Face models.** Pass the ``transformers`` model itself (or the one inside a wrapper, e.g.
the runtime's ``CausalLM.inner``): the names are then the Hugging Face names, and with the
config beside it the directory loads with ``AutoModelForCausalLM.from_pretrained``::

    save_model_weights(out / "model.safetensors", hf_model)   # every rank
    if rank == 0:
        hf_model.config.save_pretrained(out)
"""

from __future__ import annotations

import collections
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shardflow.checkpoint._collect import _is_dtensor, model_tensors
from shardflow.checkpoint._comm import resolve_comm
from shardflow.checkpoint._format import (
    CheckpointError,
    check_storable,
    fsync_dir,
    write_safetensors_stream,
)


def _full(value: Tensor) -> Tensor:
    """The whole tensor: a DTensor is all-gathered (every rank must take part), else as is."""
    with torch.no_grad():
        return value.full_tensor() if _is_dtensor(value) else value.detach()


def save_model_weights(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
) -> Path:
    """Write ``model``'s weights to the safetensors file ``path``; every rank calls it.

    Args:
        path: the ``.safetensors`` file to write (replaced atomically if it exists).
        model: a plain, DDP-wrapped, compiled or FSDP2-sharded module.
        dtype: cast floating-point tensors to this dtype as they are written (e.g.
            ``torch.bfloat16`` to halve the file); None keeps each tensor's dtype.
        process_group: the group whose rank 0 writes (default: the default group if
            ``torch.distributed`` is initialized, else this process).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is invalid: pass a floating torch.dtype or None.")
    comm = resolve_comm(process_group, None)
    final = Path(path)
    entries = model_tensors(model)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    specs = []
    for name, value in entries:
        out_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        check_storable(name, torch.empty(0, dtype=out_dtype))
        specs.append((name, value.shape, out_dtype))

    def tensors() -> Iterator[Tensor]:
        for _, value in entries:
            yield cast(_full(value))

    error = None
    tmp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(8)}")
    stream = tensors()
    if comm.rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors_stream(tmp, specs, stream, {"format": "pt"}, checksum=False)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks below
            error = exc
            tmp.unlink(missing_ok=True)
    # Other ranks take part in each gather (rank 0 finishes them after an error), keeping none.
    collections.deque(stream, maxlen=0)
    statuses = comm.all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if statuses[0] is not None:
        raise CheckpointError(f"rank 0 failed to write {str(final)!r}: {statuses[0]}")
    return final
