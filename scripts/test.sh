#!/usr/bin/env bash
# Set up (venv, dependencies, compiled kernels) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1  # no test may download anything
python -m pytest -q -ra "$@"
