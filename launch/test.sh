#!/usr/bin/env bash
# Run ShardFlow's test suite (set-up included): the README's test command, and what CI runs.
#
#   bash launch/test.sh [pytest args]     # 10-13 min of tests on 2 CPU cores (+2 min set-up once); no GPU
#   bash launch/test.sh -m slow           # the slow end-to-end tests the default run leaves out (nightly)
#
# Distributed tests start real gloo processes on this machine (free ports chosen at run time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -n 2 -q --durations=15 "$@" tests
