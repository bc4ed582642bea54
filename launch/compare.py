# Run one config with several optimizers in turn and draw them on one plot.
#
# How to run (from the repository root):
#   torchrun --standalone --nproc-per-node 2 launch/compare.py configs/quickstart.toml \
#       --optimizers adamw,dolphinflow [--lrs 1e-3,3e-3,1e-2] [--section.field VALUE ...]
# How long: the config's run time times the number of optimizers (times the number of lrs).
# Optimizer arguments: --optim.hyper.KEY VALUE goes to every listed optimizer whose constructor
#   takes KEY (e.g. --optim.hyper.factored false reaches the factored ones, not adamw).
# Needs: torch; matplotlib (plot extra) for compare.png; tqdm for the progress bar.
# Writes: <out_dir>/<optimizer>[-lr<lr>]/metrics.jsonl per run, and <out_dir>/compare.png,
#   compare.md (table, best validation loss first) and compare.json.
"""Thin torchrun entry point for optimizer comparisons; the work is in shardflow.train."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardflow.train.cli import main_compare  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_compare(sys.argv[1:]))
