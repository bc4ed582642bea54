"""Checkpoints: safetensors model and optimizer state that reshards across world sizes.

- :func:`save` / :func:`load` — a checkpoint directory (one safetensors file per rank plus
  ``index.json``), atomic, verified, loadable at any world size and placement.
- :func:`latest`, :func:`step_path`, :func:`checkpoints` — step-numbered checkpoints in a
  directory (``save(step_path(d, step), ..., keep=K)`` keeps the newest K).
- :func:`save_model_weights` — one plain safetensors file of the model's weights for other tools.
- :class:`CheckpointError` — every refusal (a ``ValueError``), naming the file and the problem.
"""

from shardflow.checkpoint._directory import checkpoints, latest, step_path
from shardflow.checkpoint._format import FORMAT_VERSION, CheckpointError
from shardflow.checkpoint.core import load, read_index, save
from shardflow.checkpoint.weights import save_model_weights

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoints",
    "latest",
    "load",
    "read_index",
    "save",
    "save_model_weights",
    "step_path",
]
