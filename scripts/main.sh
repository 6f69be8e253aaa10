#!/usr/bin/env bash
# Set up (venv, dependencies, compiled kernels) and run the main job: generate the synthetic
# MOSEI-format dataset if missing, train and evaluate HDAF and the Table-2 rows, print the table.
# Extra arguments go to `hdaf experiment`, e.g. --data-dir /path/to/CMU_MOSEI for the real data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# CPU results depend on the instruction set torch's kernels dispatch to (AVX-512 and AVX2 sum in
# different orders): pin AVX2, unless the caller set these, so that the table is the same on
# AVX2 and AVX-512 machines. configs/main.yaml pins the thread count (`threads: 1`).
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}" MKL_CBWR="${MKL_CBWR:-AVX2}" \
         ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}" \
         OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"  # numpy/scipy (the change baseline)
fi
python -m hdaf experiment --config configs/main.yaml "$@"
