#!/usr/bin/env bash
# Copies the CUTLASS/CuTe headers the CUDA kernels compile against (the nvidia-cutlass package of
# requirements.txt) to third_party/cutlass/include (git-ignored, ~27 MB), for a machine that
# builds hdaf without a package registry: carry that folder there and scripts/gpu_check.sh sets
# CUTLASS_INCLUDE_DIR to it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$("${PYTHON:-python3}" -c 'import importlib.util, os
spec = importlib.util.find_spec("cutlass_library")
print(os.path.join(spec.submodule_search_locations[0], "source", "include") if spec else "")')"
if [[ -z "$SRC" || ! -f "$SRC/cute/tensor.hpp" ]]; then
  echo "the nvidia-cutlass package is not installed (pip install -r requirements.txt)" >&2
  exit 1
fi
mkdir -p "$ROOT/third_party/cutlass/include"
cp -r "$SRC/cute" "$SRC/cutlass" "$ROOT/third_party/cutlass/include/"
echo "CuTe headers copied to third_party/cutlass/include"
