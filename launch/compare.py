# Run one config with several optimizers in turn and draw them on one plot: a thin wrapper of
# `shardflow compare` (shardflow/cli.py).
#
# How to run (from the repository root, with shardflow installed: bash launch/setup.sh):
#   torchrun --standalone --nproc-per-node 2 launch/compare.py configs/quickstart.toml \
#       --optimizers adamw,dolphinflow [--lrs 1e-3,3e-3,1e-2] [--section.field VALUE ...]
# How long: the config's run time times the number of optimizers (times the number of lrs).
# Optimizer arguments: --optim.hyper.KEY VALUE goes to every listed optimizer whose constructor
#   takes KEY (e.g. --optim.hyper.factored false reaches the factored ones, not adamw).
# Needs: torch; matplotlib (plot extra) for compare.png; tqdm for the progress bar.
# Writes: to its own folder, run.out_dir if set, else runs/<name>-compare:
#   <folder>/<optimizer>[-lr<lr>]/ per run, and <folder>/compare.png, compare.md (table, best
#   validation loss first) and compare.json.
"""Thin torchrun entry point for optimizer comparisons: ``shardflow compare``."""

import sys

from shardflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
