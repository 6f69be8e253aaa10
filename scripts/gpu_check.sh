#!/usr/bin/env bash
# The GPU check, in one command, on a machine with an NVIDIA GPU.
#
#   scripts/gpu_check.sh [--quick] [--out DIR] [--name NAME] [--skip PHASE]...
#                        [--budget PHASE=SECONDS]... [--deadline SECONDS]
#
# Phases of the full run (no --quick):
#   build      hdaf._C for the local GPU with `setup.py build_ext --inplace` (works where pip
#              cannot reach a registry and `pip install -e .` fails); PYTHONPATH set to the
#              checkout (hdaf/kernels is the committed link to kernels/)
#   info       python -m hdaf info; both GPU backends (cuda, triton) must be available
#   tests      pytest tests/ in one process: every GPU test of Triton and CUDA, every dtype
#   sanitizer  scripts/gpu_sanitizer_sweep.py plain, then under compute-sanitizer memcheck
#   bench      pytest bench/ --benchmark-only -> bench/results/gpu_<name>.{json,md}
#
# --quick: the same phases cut to fit a window of a few minutes (estimated 5-6 min on an H200
# with the build; at most 8 min by its time limits):
#   build      the local GPU's arch only, MAX_JOBS=nproc (ninja compiles the 8 CuTe kernel
#              units and the host sources in parallel)
#   tests      pytest -m quick: QUICK_GPU_TESTS in tests/conftest.py, 18 tests of both backends
#              against the float64 reference, forward and every gradient (CUDA: fp16/bf16,
#              D 64/128, grouped heads, a decoding step, a packed batch; Triton: fp32/fp16/bf16),
#              padding, causal, windows, fully masked rows; Triton runs one pinned block
#              configuration per kernel (HDAF_TRITON_CONFIGS) instead of autotuning, so each
#              test shape compiles 3 kernels instead of ~20; a skipped test fails the phase
#   sanitizer  gpu_sanitizer_sweep.py --quick under compute-sanitizer memcheck only: 3 cases on
#              both backends (causal + padding, window + causal with Dk != Dv, fully masked
#              rows), Triton configurations pinned as above
#   bench      the headline: bf16, B=4, H=16, D in {64,128}, T in {4096,16384}, fwd and
#              fwd+bwd, SDPA without bias / triton / cuda (pytest -m quick, 24 cases; Triton's
#              autotuning candidates compiled first in parallel processes) ->
#              bench/results/gpu_<name>_quick.json, and bench/report_gpu.py's tables ->
#              gpu_<name>_quick.md: per (D, T) the ms and the ratio to SDPA, targets fwd <= 1.4x
#              and fwd+bwd <= 2.0x marked met / missed
#   Time budgets in seconds (--budget PHASE=SECONDS changes one): build 180, info 30,
#   tests 120, sanitizer 120, bench 240; and every phase ends by --deadline (default 450 s after
#   the start, so with the GPU query and a SIGKILL grace the run ends within 8 min). A phase
#   still running at its limit is interrupted (SIGINT, so pytest still writes what it measured;
#   SIGKILL 20 s later) and reported as TIMEOUT; a phase with under 15 s left is skipped. The
#   full run has no limits unless --budget / --deadline are given.
#
# Each phase prints its wall time when it ends; the summary lists them all, and
# bench/results/summary_gpu_check_<name>[_quick].json holds the phases (status pass / fail /
# timeout / skip, seconds, budget, exit code, log), the GPU, commit, date and command.
#
# Needs: torch (CUDA build) with pytest and pytest-benchmark, nvcc (CUDA_HOME or PATH), and
# compute-sanitizer (PATH, $CUDA_HOME/bin or $CUDA_HOME/compute-sanitizer). Environment: PYTHON
# (default python3), MAX_JOBS (default: nproc), TORCH_CUDA_ARCH_LIST (default: the local GPU's).
# Logs go to build/gpu_check/ and, with --out DIR (default $OUT when set), are copied there with
# the bench results and the summary. Every phase runs even when an earlier one failed (except
# after a failed build); the exit status is 1 if any phase failed or timed out.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CMDLINE="scripts/gpu_check.sh${*:+ $*}"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-}"
NAME=""
SKIP=" "
QUICK=0
DEADLINE=""
declare -A BUDGET=()
PHASES=(build info tests sanitizer bench)
die() { echo "gpu_check: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --out) OUTDIR="${2:?--out needs a folder}"; shift 2 ;;
    --name) NAME="${2:?--name needs a name}"; shift 2 ;;
    --skip) SKIP+="${2:?--skip needs a phase} "; shift 2 ;;
    --budget)
      [[ "${2:-}" =~ ^(build|info|tests|sanitizer|bench)=([0-9]+)$ ]] \
        || die "--budget wants PHASE=SECONDS with PHASE one of ${PHASES[*]}, got '${2:-}'"
      BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift 2 ;;
    --deadline)
      [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--deadline wants seconds, got '${2:-}'"
      DEADLINE="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
if [[ $QUICK -eq 1 ]]; then
  declare -A QUICK_BUDGET=([build]=180 [info]=30 [tests]=120 [sanitizer]=120 [bench]=240)
  for p in "${PHASES[@]}"; do BUDGET[$p]="${BUDGET[$p]:-${QUICK_BUDGET[$p]}}"; done
  DEADLINE="${DEADLINE:-450}"
fi
MIN_PHASE_S=15
LOGDIR="$ROOT/build/gpu_check"
RESULTS="bench/results"
mkdir -p "$LOGDIR" "$RESULTS"
SUFFIX=""
if [[ $QUICK -eq 1 ]]; then SUFFIX="_quick"; fi
# One Triton block configuration per kernel for the quick tests and sweep: (BLOCK_M, BLOCK_N,
# num_warps, num_stages), from the autotuning lists, small enough for float32 and head dim 128.
QUICK_TRITON_CONFIGS="fwd=64,32,4,2 dkdv=32,64,4,2 dq=64,32,4,2"
declare -a SUMMARY=() P_NAME=() P_STATUS=() P_SECS=() P_BUDGET=() P_RC=()
FAILED=0
START=$SECONDS
GPU=""

# run_step NAME FUNCTION: runs FUNCTION in a child bash that stops at its first failing command,
# under `timeout` when the phase has a limit; logs to $LOGDIR/NAME.log, prints the wall time,
# records the outcome, sets STEP_RC and always returns 0. (Never call it after `||`, `&&` or in
# an `if`: bash would then ignore errexit inside the step.)
run_step() {
  local name="$1" fn="$2" limit="${BUDGET[$1]:-}" start rc status left
  STEP_RC=0
  if [[ "$SKIP" == *" $name "* ]]; then
    record "$name" skip 0 "$limit" 0 "SKIP  $name (--skip)"; return 0
  fi
  if [[ -n "$DEADLINE" ]]; then
    left=$((START + DEADLINE - SECONDS))
    if ((left < MIN_PHASE_S)); then
      record "$name" skip 0 "$limit" 0 "SKIP  $name (${left} s left of the ${DEADLINE} s deadline)"
      FAILED=1; STEP_RC=124; return 0
    fi
    if [[ -z "$limit" ]] || ((limit > left)); then limit=$left; fi
  fi
  echo "==== gpu_check: $name (${limit:+limit $limit s, }started at $((SECONDS - START)) s) ====" \
    | tee "$LOGDIR/$name.log"
  start=$SECONDS
  set +e
  if [[ -n "$limit" ]]; then
    local pgid_file="$LOGDIR/.$name.pgid"
    rm -f "$pgid_file"
    # timeout leads a process group of its own and signals all of it; the child writes
    # timeout's pid (that group's id) so that what the phase leaves behind can be ended below.
    local log_fd tee_pid
    exec {log_fd}> >(tee -a "$LOGDIR/$name.log")
    tee_pid=$!
    # shellcheck disable=SC2016  # $1, $2 and $PPID are the child bash's
    timeout -s INT -k 20 "$limit" bash -c 'echo "$PPID" > "$2"; set -euo pipefail; "$1"' _ \
      "$fn" "$pgid_file" >&"$log_fd" 2>&1
    rc=$?
    exec {log_fd}>&-
    # A process of the phase still running (one that ignored SIGINT, or a daemon) would keep
    # the log pipe open and this script waiting past the phase's limit: end it.
    if [[ -s "$pgid_file" ]]; then kill -KILL -- "-$(cat "$pgid_file")" 2>/dev/null; fi
    wait "$tee_pid" 2>/dev/null  # the tee, now that nothing writes to it
  else
    # shellcheck disable=SC2016  # $1 is the child bash's: the step function's name
    bash -c 'set -euo pipefail; "$1"' _ "$fn" 2>&1 | tee -a "$LOGDIR/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  set -e
  STEP_RC=$rc
  local secs=$((SECONDS - start)) line
  local took="$secs s${limit:+ of $limit s}"
  if [[ $rc -eq 0 ]]; then
    status=pass; line="PASS  $name ($took)"
  elif [[ -n "$limit" && ( $rc -eq 124 || $rc -eq 137 ) ]]; then
    status=timeout; FAILED=1
    line="TIMEOUT $name ($took: stopped at its limit; log: $LOGDIR/$name.log)"
  else
    status=fail; FAILED=1; line="FAIL  $name (exit $rc, $took; log: $LOGDIR/$name.log)"
  fi
  record "$name" "$status" "$secs" "$limit" "$rc" "$line"
  echo "==== gpu_check: $line; $((SECONDS - START)) s since the start ===="
  return 0
}

record() {  # NAME STATUS SECONDS BUDGET RC SUMMARY-LINE
  P_NAME+=("$1"); P_STATUS+=("$2"); P_SECS+=("$3"); P_BUDGET+=("$4"); P_RC+=("$5"); SUMMARY+=("$6")
}

json_str() {  # a JSON string literal of $1
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\t'/\\t}"; s="${s//$'\r'/\\r}"
  printf '"%s"' "$s"
}

write_summary() {  # the machine-readable summary: bench/results/summary_gpu_check_<name>.json
  local path="$RESULTS/summary_gpu_check_${NAME:-unknown}${SUFFIX}.json" i sep="" commit dirty
  commit="$(git rev-parse HEAD 2>/dev/null || true)"
  dirty="$(git status --porcelain --untracked-files=no 2>/dev/null | head -c1 || true)"
  {
    printf '{\n  "command": %s,\n  "mode": %s,\n' "$(json_str "$CMDLINE")" \
      "$(json_str "$([[ $QUICK -eq 1 ]] && echo quick || echo full)")"
    printf '  "gpu": %s,\n  "name": %s,\n' "$(json_str "$GPU")" "$(json_str "$NAME")"
    printf '  "commit": %s,\n  "dirty": %s,\n' "$(if [[ -n "$commit" ]]; then json_str "$commit"; else echo null; fi)" \
      "$([[ -n "$dirty" ]] && echo true || echo false)"
    printf '  "date_utc": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
    printf '  "deadline_s": %s,\n  "total_s": %d,\n' "${DEADLINE:-null}" "$((SECONDS - START))"
    printf '  "passed": %s,\n' "$([[ $FAILED -eq 0 ]] && echo true || echo false)"
    printf '  "bench_json": %s,\n' "$(json_str "$RESULTS/gpu_${NAME}${SUFFIX}.json")"
    printf '  "bench_md": %s,\n  "phases": [' "$(json_str "$RESULTS/gpu_${NAME}${SUFFIX}.md")"
    for i in "${!P_NAME[@]}"; do
      printf '%s\n    {"name": %s, "status": %s, "seconds": %d, "budget_s": %s, "exit": %d, "log": %s}' \
        "$sep" "$(json_str "${P_NAME[$i]}")" "$(json_str "${P_STATUS[$i]}")" "${P_SECS[$i]}" \
        "${P_BUDGET[$i]:-null}" "${P_RC[$i]}" "$(json_str "build/gpu_check/${P_NAME[$i]}.log")"
      sep=","
    done
    printf '\n  ]\n}\n'
  } > "$path"
  echo "$path"
}

finish() {
  local summary
  summary="$(write_summary)"
  if [[ -n "$OUTDIR" ]]; then
    mkdir -p "$OUTDIR"
    cp -r "$LOGDIR" "$OUTDIR/" || true
    cp "$summary" "$RESULTS/gpu_${NAME}${SUFFIX}".{json,md} "$OUTDIR/" 2>/dev/null || true
  fi
  echo
  echo "==== gpu_check summary ($([[ $QUICK -eq 1 ]] && echo quick || echo full), $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $((SECONDS - START)) s${DEADLINE:+ of the $DEADLINE s deadline}) ===="
  printf '%s\n' "${SUMMARY[@]}"
  echo "summary: $summary"
  if [[ -n "$OUTDIR" ]]; then echo "logs and results copied to $OUTDIR"; fi
  if [[ $FAILED -ne 0 ]]; then echo "gpu_check: FAILED"; exit 1; fi
  echo "gpu_check: all phases passed"
}

gpu_query() {  # prints "<compute capability> <name>" of GPU 0
  "$PY" -c 'import torch
assert torch.cuda.is_available(), "torch sees no CUDA GPU (torch %s, CUDA %s)" % (torch.__version__, torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print(f"{p.major}.{p.minor} {p.name}")'
}

step_build() {
  local arch
  arch="${GPU%% *}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  # The CUDA kernels are CuTe: setup.py finds the headers through the nvidia-cutlass package or
  # CUTLASS_INCLUDE_DIR; a machine without a registry gets a copy in third_party/cutlass/include
  # (scripts/vendor_cutlass_headers.sh, git-ignored).
  if [[ -z "${CUTLASS_INCLUDE_DIR:-}" && -f third_party/cutlass/include/cute/tensor.hpp ]]; then
    export CUTLASS_INCLUDE_DIR="$ROOT/third_party/cutlass/include"
  fi
  echo "CuTe headers: ${CUTLASS_INCLUDE_DIR:-from the nvidia-cutlass package}"
  "$PY" -c "from torch.utils.cpp_extension import is_ninja_available as n
print('ninja:', 'yes, sources compile in parallel' if n() else 'NO: sources compile one at a time')"
  echo "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
  HDAF_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace
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
  if [[ $QUICK -eq 0 ]]; then
    HF_HUB_OFFLINE=1 "$PY" -m pytest tests/ -q -ra -p no:cacheprovider
    return
  fi
  echo "Triton configurations pinned: $QUICK_TRITON_CONFIGS"
  HF_HUB_OFFLINE=1 HDAF_TRITON_CONFIGS="$QUICK_TRITON_CONFIGS" "$PY" -m pytest \
    tests/test_cuda.py tests/test_triton.py -m quick -q -ra -p no:cacheprovider \
    | tee "$LOGDIR/tests_pytest.txt"
  if grep -Eq '[0-9]+ skipped' "$LOGDIR/tests_pytest.txt"; then
    echo "a quick GPU test was skipped: on a GPU machine every one must run" >&2
    return 1
  fi
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
  # Without torch's caching allocator every tensor is its own allocation: memcheck then sees
  # an access past a tensor's end instead of into a neighbour's cached block.
  if [[ $QUICK -eq 1 ]]; then
    # Pinned configurations: no autotuning under memcheck, so no plain pass is needed first.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 --print-limit 50 \
      "$PY" scripts/gpu_sanitizer_sweep.py --quick --triton-configs "$QUICK_TRITON_CONFIGS"
    return
  fi
  # The plain pass checks the results and fills the on-disk Triton autotuning cache, so the
  # memcheck pass launches the tuned kernels instead of benchmarking every configuration.
  export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR="$LOGDIR/triton_cache"
  "$PY" scripts/gpu_sanitizer_sweep.py
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 --print-limit 50 \
    "$PY" scripts/gpu_sanitizer_sweep.py
}

step_bench() {
  local json="$RESULTS/gpu_${NAME}${SUFFIX}.json" md="$RESULTS/gpu_${NAME}${SUFFIX}.md" rc=0
  if [[ $QUICK -eq 0 ]]; then
    HDAF_BENCH_COMMAND="$CMDLINE" "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$json"
    "$PY" bench/report.py "$json" > "$md"
    cat "$md"
    echo "wrote $json and $md"
    return
  fi
  rm -f "$json" "$md"
  local t0=$SECONDS
  # Not fatal: without it the autotuner compiles the same kernels itself, one after the other.
  "$PY" bench/bench_delta_attention_gpu.py --precompile --quick \
    || echo "precompiling Triton's configurations failed; the autotuner compiles them instead"
  echo "precompile: $((SECONDS - t0)) s"
  # A run stopped at its limit still writes the cases it measured (pytest ends on SIGINT),
  # and the report still runs on them.
  HDAF_BENCH_COMMAND="$CMDLINE" "$PY" -m pytest bench/bench_delta_attention_gpu.py -m quick \
    --benchmark-only -q -p no:cacheprovider --benchmark-json="$json" || rc=$?
  local report_rc=0
  "$PY" bench/report_gpu.py "$json" > "$md" || report_rc=$?
  cat "$md"
  echo "wrote $json and $md"
  if [[ $rc -ne 0 ]]; then return "$rc"; fi
  return "$report_rc"
}

export ROOT PY QUICK LOGDIR RESULTS NAME SUFFIX CMDLINE QUICK_TRITON_CONFIGS GPU
export -f gpu_query find_sanitizer step_build step_info step_tests step_sanitizer step_bench
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ $QUICK -eq 1 ]]; then
  # One Triton cache for every phase (kept between runs in the same checkout).
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$LOGDIR/triton_cache}"
fi
trap finish EXIT
if ! GPU="$(gpu_query)"; then
  record gpu fail 0 "" 1 "FAIL  gpu (torch sees no CUDA GPU: nothing was run)"; FAILED=1; exit 1
fi
export GPU
STEP_RC=0
echo "GPU: $GPU (compute capability ${GPU%% *})"
if [[ -z "$NAME" ]]; then
  NAME="$(echo "${GPU#* }" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')"
fi
export NAME
run_step build step_build
if [[ $STEP_RC -ne 0 ]]; then exit 1; fi  # nothing else can run without the extension
run_step info step_info
run_step tests step_tests
run_step sanitizer step_sanitizer
run_step bench step_bench
