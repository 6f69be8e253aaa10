#!/usr/bin/env bash
# Set up (venv, dependencies, compiled kernels) and run the main job: generate the synthetic
# MOSEI-format dataset if missing, train and evaluate HDAF and the Table-2 rows, print the table.
# Extra arguments go to `hdaf experiment`, e.g. --data-dir /path/to/CMU_MOSEI for the real data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m hdaf experiment --config configs/main.yaml "$@"
