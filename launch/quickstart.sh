#!/usr/bin/env bash
# The quickstart: a 6M-parameter Llama-style model trained on the running Python's own
# standard library, 2 ranks with FSDP2 on CPU (gloo), DolphinFlow.
#
# How to run:   bash launch/quickstart.sh [--section.field VALUE ...]
# How long:     about 2 minutes on 2 CPU cores (startup included).
# Needs:        torch; tqdm (progress bar) and matplotlib (loss PNG) are optional. No download.
# Writes:       runs/quickstart/{metrics.jsonl,loss.png,summary.json,checkpoints/,final/}
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node 2 launch/train.py configs/quickstart.toml "$@"
