#!/usr/bin/env bash
# Set up the environment and build hdaf's kernels. Uses the active virtual environment if there
# is one, else creates ./.venv. Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
python -m pip install -q --upgrade pip
python -m pip install -q -r "$ROOT/requirements.txt"
# setup.py imports torch to compile the extension, so the build must see the installed torch.
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
python -m hdaf info
