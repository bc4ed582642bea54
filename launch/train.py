# Train from a TOML run config: a thin wrapper of `shardflow train` (shardflow/cli.py).
#
# How to run (from the repository root, with shardflow installed: bash launch/setup.sh):
#   torchrun --standalone --nproc-per-node 2 launch/train.py configs/quickstart.toml
#   python launch/train.py configs/smollm2-135m-1gpu.toml --optim.lr 3e-4 --train.steps 200
#   python launch/train.py configs/llama3-8b-fsdp8.toml --dry-run      # plan only, no allocation
#   python launch/train.py configs/smollm2-135m-offload.toml           # one GPU, optimizer on host
# The same as `shardflow train CONFIG ...` or `torchrun ... -m shardflow.cli train CONFIG ...`.
# Overrides: any field as --section.field VALUE (or --section.field=VALUE); a table field one key
#   at a time (--optim.hyper.factored false) or whole (--optim.hyper '{factored = false}').
# How long: the quickstart about 2 minutes on 2 CPU cores; other configs as their header says.
# Needs: torch; tqdm for the progress bar, matplotlib for the loss PNG (plot extra),
#   transformers for Hugging Face models (hf extra). The process count must match run.nproc.
# Writes: <out_dir>/metrics.jsonl, loss.png, summary.json, checkpoints/step_<N>/ (safetensors;
#   a rerun of the same run resumes from the newest, at any world size), final/model.safetensors.
"""Thin torchrun entry point for training: ``shardflow train``."""

import sys

from shardflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
