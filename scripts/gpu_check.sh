#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU (issue 10, part 4):
#   1. build    hdaf._C for the local GPU with `setup.py build_ext --inplace` (works where pip
#               cannot reach a registry and `pip install -e .` fails); kernels/ linked as
#               hdaf/kernels when hdaf is not installed; PYTHONPATH set to the checkout
#   2. info     python -m hdaf info
#   3. tests    pytest tests/ in one process: every GPU test of Triton and CUDA, every dtype
#   4. sanitizer  scripts/gpu_sanitizer_sweep.py plain, then under compute-sanitizer memcheck
#   5. bench    pytest bench/ --benchmark-only -> bench/results/gpu_<name>.{json,md}
#
#   scripts/gpu_check.sh [--out DIR] [--name NAME] [--skip STEP]...
#
# Needs: torch (CUDA build) with pytest and pytest-benchmark, nvcc (CUDA_HOME or PATH), and
# compute-sanitizer (PATH, $CUDA_HOME/bin or $CUDA_HOME/compute-sanitizer). Environment: PYTHON
# (default python3), MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default: the local GPU's).
# Logs go to build/gpu_check/ and, with --out DIR (default $OUT when set), are copied there.
# Every step runs even when an earlier one failed (except after a failed build); the summary at
# the end says which passed, and the exit status is 1 if any failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-}"
NAME=""
SKIP=" "
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUTDIR="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --skip) SKIP+="$2 "; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
LOGDIR="$ROOT/build/gpu_check"
mkdir -p "$LOGDIR" bench/results
declare -a SUMMARY=()
FAILED=0

# run_step NAME CMD...: runs CMD in a subshell that stops at its first failing command, logs
# to $LOGDIR/NAME.log, records the outcome in SUMMARY and STEP_RC, and always returns 0. (Never
# call it after `||`, `&&` or in an `if`: bash would then ignore errexit inside the step.)
run_step() {
  local name="$1"; shift
  STEP_RC=0
  if [[ "$SKIP" == *" $name "* ]]; then
    SUMMARY+=("SKIP  $name (--skip)"); return 0
  fi
  echo "==== gpu_check: $name ====" | tee "$LOGDIR/$name.log"
  local start=$SECONDS rc
  set +e
  ( set -euo pipefail; "$@" ) 2>&1 | tee -a "$LOGDIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  STEP_RC=$rc
  if [[ $rc -eq 0 ]]; then
    SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
  else
    SUMMARY+=("FAIL  $name (exit $rc, $((SECONDS - start)) s; log: $LOGDIR/$name.log)")
    FAILED=1
  fi
  return 0
}

finish() {
  if [[ -n "$OUTDIR" ]]; then
    mkdir -p "$OUTDIR"
    cp -r "$LOGDIR" "$OUTDIR/" || true
    cp bench/results/gpu_* "$OUTDIR/" 2>/dev/null || true
  fi
  echo
  echo "==== gpu_check summary ($(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')) ===="
  printf '%s\n' "${SUMMARY[@]}"
  [[ -n "$OUTDIR" ]] && echo "logs copied to $OUTDIR"
  if [[ $FAILED -ne 0 ]]; then echo "gpu_check: FAILED"; exit 1; fi
  echo "gpu_check: all steps passed"
}

gpu_query() {  # prints "<compute capability> <name>" of GPU 0
  "$PY" -c 'import torch
assert torch.cuda.is_available(), "torch sees no CUDA GPU (torch %s, CUDA %s)" % (torch.__version__, torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print(f"{p.major}.{p.minor} {p.name}")'
}

step_build() {
  local arch
  arch="$(gpu_query | cut -d' ' -f1)"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
  echo "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=${MAX_JOBS:-16}"
  HDAF_FORCE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  if ! "$PY" -c "import hdaf.kernels" 2>/dev/null && [[ ! -e hdaf/kernels ]]; then
    ln -s ../kernels hdaf/kernels  # what the installed package maps to hdaf.kernels
    echo "linked kernels/ as hdaf/kernels"
  fi
  "$PY" -c "import hdaf, hdaf.kernels; print('import hdaf:', hdaf.__file__)"
}

step_info() {
  "$PY" -m hdaf info
  "$PY" -c "import hdaf, sys
info = hdaf.backends()
missing = [b for b in ('cuda', 'triton') if b not in info['available'].get('cuda', [])]
sys.exit(f'GPU backends not available: {missing} ({info})' if missing else 0)"
}

step_tests() {
  HF_HUB_OFFLINE=1 "$PY" -m pytest tests/ -q -ra -p no:cacheprovider
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)" >&2
  return 1
}

step_sanitizer() {
  local san
  san="$(find_sanitizer)"
  # The plain pass checks the results and fills the on-disk Triton autotuning cache, so the
  # memcheck pass launches the tuned kernels instead of benchmarking every configuration.
  export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR="$LOGDIR/triton_cache"
  "$PY" scripts/gpu_sanitizer_sweep.py
  # Without torch's caching allocator every tensor is its own allocation: memcheck then sees
  # an access past a tensor's end instead of into a neighbour's cached block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 --print-limit 50 \
    "$PY" scripts/gpu_sanitizer_sweep.py
}

step_bench() {
  local json="bench/results/gpu_${NAME}.json" md="bench/results/gpu_${NAME}.md"
  "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$json"
  "$PY" bench/report.py "$json" > "$md"
  cat "$md"
  echo "wrote $json and $md"
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
trap finish EXIT
if ! GPU="$(gpu_query)"; then
  SUMMARY+=("FAIL  gpu (torch sees no CUDA GPU: nothing was run)"); FAILED=1; exit 1
fi
STEP_RC=0
echo "GPU: $GPU (compute capability ${GPU%% *})"
if [[ -z "$NAME" ]]; then
  NAME="$(echo "${GPU#* }" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')"
fi
run_step build step_build
if [[ $STEP_RC -ne 0 ]]; then exit 1; fi  # nothing else can run without the extension
run_step info step_info
run_step tests step_tests
run_step sanitizer step_sanitizer
run_step bench step_bench
