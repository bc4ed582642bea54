#!/usr/bin/env bash
# Set up ShardFlow in ./.venv on a fresh machine (Python 3.11+ and pip, nothing else needed).
#
#   bash launch/setup.sh          # idempotent; ~1-2 min the first time, seconds after
#
# Installs torch==2.13.0 FIRST (pinned: an unpinned torch would pull a multi-GB CUDA build),
# then shardflow in editable mode with its extras; checks that nothing replaced torch.
# Sourced by launch/quickstart.sh and launch/test.sh, which are the README's two commands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import shardflow, pytest, xdist, safetensors, bitsandbytes, transformers, accelerate, matplotlib, tqdm" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet -e ".[bnb,hf,plot,progress,test,dev]"
fi
.venv/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$TORCH_VERSION' else f'torch {v} replaced torch $TORCH_VERSION')"
