#!/usr/bin/env bash
# The GPU check: one command for a machine with a GPU, nvcc, CMake, Python and PyTorch, that
# needs no network. It builds and tests with the packages the machine has (the torch, jax and
# pytest there, whatever their versions); a folder .whl/ of wheels, if present, supplies build
# or test packages it lacks. From the repository root:
#
#     bash benchmarks/gpu_check.sh             # on the GPU machine (about 8 minutes)
#     bash benchmarks/gpu_check.sh --dry-run   # no GPU: every step with CPU stand-ins (CI)
#     bash benchmarks/gpu_check.sh --pytest-args   # print the pytest options it uses, and exit
#
# Steps, under ONE deadline (SD_BUDGET seconds, default 470, the table included): a step gets
# min(its cap, what is left); one that runs out is reported TIMED OUT and the next steps still
# run; one that cannot start in time is NOT RUN. The measurements come first, so that their
# numbers exist even when the tests run out of time.
#   wheels    install from .whl/ only the build/test packages the machine lacks or has too old
#   build     stochdepth from source with CUDA for this GPU's architecture, -lineinfo
#   compact   benchmarks/gpu_compact.py: the StochasticResidual kernels vs the library's copy
#   bench     python -m stochdepth.bench --device cuda (JSON rewritten after every op)
#   pytest    -m "not slow", a per-test timeout, JUnit XML in $OUT/pytest.xml; beside it:
#   sanitize  compute-sanitizer memcheck and racecheck on the library's kernels only (run_kernel);
#             NOT RUN where the machine has no compute-sanitizer or refuses it
# The last thing printed is the table: each target, the measured value, PASS / FAIL / NOT RUN;
# it is also written to $OUT/gpu_table.txt. Everything goes to $OUT/gpu_check.log too. Exit
# status 0 only if every step that ran passed.
# Knobs: SD_BUDGET, SD_CUDA_ARCH (default: this GPU's), SD_JOBS, SD_PYTEST_ARGS, SD_MEMCHECK_K,
# SD_RACECHECK_K, SD_GAMMA_MEMCHECK_K, SD_GAMMA_RACECHECK_K, SD_BENCH_ARGS, SD_SKIP (step names),
# SD_DRY_RUN=1 (same as --dry-run),
# SD_DRY_STEP_SECONDS (dry runs only: seconds each step spends first; for the deadline's test).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

PY="${PYTHON:-python3}"

# The pytest options of the pytest and sanitize steps. pytest-timeout, where installed, is
# already loaded by its entry point: naming it again with -p makes pluggy abort ("Plugin already
# registered under a different name"), so only --timeout is passed. The long tests carry their
# own limits (@pytest.mark.timeout: the JAX suite, DDP, torch.compile). Deprecation warnings
# are not errors here: the machine's jax or torch may be newer than the pins CI tests with.
WARNING_OPTS=(-W ignore::DeprecationWarning -W ignore::PendingDeprecationWarning)
PYTEST_OPTS=(-p no:cacheprovider -m "not slow" "${WARNING_OPTS[@]}")
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_OPTS+=(--timeout=60)
else
  PYTEST_OPTS+=(-o faulthandler_timeout=60)
fi
if [[ "${1:-}" == "--pytest-args" ]]; then
  printf '%s\n' "${PYTEST_OPTS[@]}"
  exit 0
fi

DRY="${SD_DRY_RUN:-0}"
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-/tmp/stochdepth_gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

JOBS="${SD_JOBS:-16}"
BUDGET="${SD_BUDGET:-470}"
RESERVE=8 # seconds kept for the table
SITE=/tmp/sd-site # packages from .whl/ that the machine lacks
PKG=/tmp/sd-pkg   # the stochdepth build
STEPS="$OUT/steps.tsv"
: >"$STEPS"
export PY SITE PKG DRY OUT
export STOCHDEPTH_IN_GPU_CHECK=1 # tests/test_gpu_check.py: no dry run inside the real run
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/sd-hypothesis
export XLA_PYTHON_CLIENT_PREALLOCATE=false # a JAX GPU test shares the GPU with torch's tests
# The JAX suite runs in a pytest of its own (tests/test_jax.py): the same warning options.
export PYTEST_ADDOPTS="${WARNING_OPTS[*]}"
if [[ "$DRY" != 1 ]]; then
  export STOCHDEPTH_EXPECT_CUDA=1
  export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
DEADLINE=$((SECONDS + BUDGET))
FAILED=0

# step NAME CAP CMD... : CMD under `timeout min(CAP, time left)`; one line in $STEPS.
step() {
  local name=$1 cap=$2
  shift 2
  if [[ " ${SD_SKIP:-} " == *" $name "* ]]; then
    printf '%s\tNOT RUN\tskipped (SD_SKIP)\n' "$name" >>"$STEPS"
    return 0
  fi
  local left=$((DEADLINE - SECONDS - RESERVE))
  if ((left < 5)); then
    printf '%s\tNOT RUN\tno time left before the deadline\n' "$name" >>"$STEPS"
    FAILED=1
    return 125
  fi
  ((cap > left)) && cap=$left
  local t=$SECONDS
  echo
  echo "==== [$name] $(date -u +%H:%M:%S) cap ${cap}s: $*"
  # Dry runs only: each step first spends SD_DRY_STEP_SECONDS of the budget, so that the test
  # of the shared deadline does not depend on how fast this machine runs the stand-ins.
  if [[ "$DRY" == 1 && -n "${SD_DRY_STEP_SECONDS:-}" ]]; then sleep "$SD_DRY_STEP_SECONDS"; fi
  if declare -F "$1" >/dev/null; then # a function of this script: timeout needs a program
    timeout --kill-after=10 "$cap" bash -c "$(declare -p PYTEST_OPTS); $(declare -f "$1"); \"\$@\"" \
      _ "$@"
  else
    timeout --kill-after=10 "$cap" "$@"
  fi
  local rc=$?
  local status=PASS note="rc=$rc, $((SECONDS - t))s"
  [[ $rc -ne 0 ]] && status=FAIL
  [[ $rc -eq 124 || $rc -eq 137 ]] && status=FAIL note="TIMED OUT at ${cap}s"
  # rc 3: the step's tool cannot run on this machine (said in its output): not a failure.
  [[ $rc -eq 3 ]] && status="NOT RUN" note="tool unavailable here, $((SECONDS - t))s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$note" >>"$STEPS"
  [[ $rc -ne 0 && $rc -ne 3 ]] && FAILED=1
  return $rc
}

# ---- 0. the machine
echo "stochdepth gpu_check$([[ "$DRY" == 1 ]] && echo ' (DRY RUN: CPU stand-ins)'):" \
  "$(date -u) on $(uname -n), budget ${BUDGET}s"
ARCH="${SD_CUDA_ARCH:-}"
if [[ "$DRY" != 1 ]]; then
  PATH="$PATH:/usr/local/nvidia/bin" nvidia-smi --format=csv,noheader \
    --query-gpu=name,driver_version,memory.total,compute_cap 2>&1 | sed 's/^/GPU: /'
  [[ -z "$ARCH" ]] && ARCH=$(PATH="$PATH:/usr/local/nvidia/bin" nvidia-smi \
    --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  nvcc --version | tail -2
fi
ARCH="${ARCH:-90}"
export ARCH
"$PY" -c 'import sys; print("python", sys.version.split()[0])'
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "devices", torch.cuda.device_count())' 2>&1 | tail -1

# ---- 1. wheels: only what is missing or older than the build and the suite need
install_wheels() {
  local need
  need=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, os, re
from packaging.version import Version
minimum = {"scikit-build-core": "0.10", "pybind11": "2.12", "ml-dtypes": "0.3", "pytest": "8",
           "hypothesis": "6", "pluggy": "1.5", "iniconfig": "1", "pytest-timeout": "2"}
for whl in sorted(glob.glob(".whl/*.whl")):
    name = re.sub(r"[-_.]+", "-", os.path.basename(whl).split("-")[0]).lower()
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or have < Version(minimum.get(name, "0")):
        print(whl)
EOF
  ) || return 1
  if [[ -z "$need" ]]; then
    echo "every build/test package is already installed (or .whl/ is empty)"
    return 0
  fi
  if [[ "$DRY" == 1 ]]; then
    echo "dry run: would install into $SITE:" $need
    return 0
  fi
  echo "installing into $SITE:" $need
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $need
}
step wheels 60 install_wheels

# ---- 2. build from source, CUDA required, -lineinfo for compute-sanitizer
build() {
  local check='import json, stochdepth
info = stochdepth.build_info()
print(json.dumps(info))
assert info["cuda_compiled"], "CUDA not compiled in"
from stochdepth import _cuda_emulator  # noqa: F401  (the CI tests of the kernels)
'
  if [[ "$DRY" == 1 ]]; then
    echo "dry run: would build with -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH-real" \
      "-Ccmake.define.STOCHDEPTH_CUDA_LINEINFO=ON; checking the installed package instead"
    "$PY" -c "$check"
    return
  fi
  rm -rf "$PKG"
  STOCHDEPTH_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    --no-cache-dir --target "$PKG" -Cbuild-dir=/tmp/sd-build \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH-real" \
    -Ccmake.define.STOCHDEPTH_CUDA_LINEINFO=ON . &&
    (cd /tmp && "$PY" -c "$check
assert stochdepth.__file__.startswith('$PKG'), stochdepth.__file__
assert info['cuda_device_count'] > 0, 'no GPU seen'")
}
# tests/test_build_info.py then expects this arch alone (a dry run keeps the caller's build).
[[ "$DRY" == 1 ]] || export STOCHDEPTH_EXPECT_CUDA_ARCHS="$ARCH-real"
BUILD_OK=1
step build 240 build || BUILD_OK=0

# ---- 3. the benchmarks first, alone on the GPU; JSON rewritten as they go
bench() {
  if [[ "$DRY" == 1 ]]; then
    "$PY" benchmarks/bench_fake_cuda.py --device cuda --quick --no-compile --no-keras --no-progress \
      --cases small --json "$OUT/bench_cuda.json"
  else
    # shellcheck disable=SC2086
    "$PY" -m stochdepth.bench --device cuda --no-progress --no-keras \
      --cases vit1024-bf16,vit256-f32 --json "$OUT/bench_cuda.json" ${SD_BENCH_ARGS:-}
  fi
}
compact() {
  if [[ "$DRY" == 1 ]]; then
    "$PY" benchmarks/gpu_compact.py --dry-run --batch 64 --inner 1000 --rounds 3 \
      --json "$OUT/compact.json"
  else
    "$PY" benchmarks/gpu_compact.py --json "$OUT/compact.json"
  fi
}
rm -f "$OUT/bench_cuda.json" "$OUT/compact.json"
if [[ "$BUILD_OK" == 1 ]]; then
  step compact 60 compact
  step bench 200 bench
else
  printf '%s\tNOT RUN\tno build\n' compact bench >>"$STEPS"
fi

# ---- 4. pytest, with the sanitizers beside it (functional runs; nothing timed)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
export SAN
export MEMCHECK_K="${SD_MEMCHECK_K:-bf16 or mask or raw or stream or empty or outlives or compact}"
export RACECHECK_K="${SD_RACECHECK_K:-(bf16 and (reference or misaligned)) or compact}"
# The layer scale's kernels (DenseKernel with gamma, the backward's column sums): a few bf16
# cases of their own file, so that the step's time grows by seconds ("reverse": the emulated
# kernels' test, which a dry run selects; the GPU file has none of that name).
export GAMMA_MEMCHECK_K="${SD_GAMMA_MEMCHECK_K:-bf16 and (misaligned or every)}"
export GAMMA_RACECHECK_K="${SD_GAMMA_RACECHECK_K:-bf16 and (misaligned or reverse)}"
sanitize() {
  local rc=0 filter=(--kernel-name kns=run_kernel) # the library's kernels only, not torch's
  if [[ "$DRY" != 1 ]]; then
    [[ -n "$SAN" ]] || { echo "compute-sanitizer not found: not run"; return 3; }
    "$SAN" --help 2>&1 | grep -q -- --kernel-name || filter=(--filter kns=run_kernel)
    # Some sandboxes (gVisor) refuse the sanitizer ("Device not supported"): say so, in seconds.
    if "$SAN" --tool memcheck "$PY" -c "import torch; torch.ones(1, device='cuda').sum().item()" \
      2>&1 | grep -i "not supported"; then
      echo "compute-sanitizer cannot run on this machine"
      return 3
    fi
  fi
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1 # every tensor its own allocation: memcheck sees its end
  local tests=tests/test_drop_path_cuda.py gamma_tests=tests/test_layer_scale_cuda.py
  # Dry run: the same pytest lines without the sanitizer, plus the emulated kernels' tests, so
  # that the -k expressions select something where the GPU tests skip.
  [[ "$DRY" == 1 ]] && tests+=" tests/test_cuda_emulated.py"
  [[ "$DRY" == 1 ]] && gamma_tests+=" tests/test_layer_scale_cuda_emulated.py"
  for tool in memcheck racecheck; do
    local k="$MEMCHECK_K" gk="$GAMMA_MEMCHECK_K" cmd=(env)
    [[ $tool == racecheck ]] && k="$RACECHECK_K" gk="$GAMMA_RACECHECK_K"
    if [[ "$DRY" != 1 ]]; then
      cmd=("$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 "${filter[@]}")
      [[ $tool == racecheck ]] && cmd+=(--racecheck-report analysis)
    fi
    echo "== $tool (${cmd[*]}): -k '$k'"
    # shellcheck disable=SC2086
    "${cmd[@]}" "$PY" -m pytest -q "${PYTEST_OPTS[@]}" $tests -k "$k" || rc=1
    echo "== $tool, the layer scale: -k '$gk'"
    # shellcheck disable=SC2086
    "${cmd[@]}" "$PY" -m pytest -q "${PYTEST_OPTS[@]}" $gamma_tests -k "$gk" || rc=1
  done
  return $rc
}
run_pytest() {
  local tests=(tests)
  # tests/test_jax.py runs the JAX suite (tests/jax) in its own process: where this machine's
  # jax sees the GPU, its GPU tests (the CUDA FFI targets) must run, not skip; without jax (the
  # bare image) test_jax.py is a skip, and with a CPU-only jax the GPU tests skip.
  if [[ "$DRY" != 1 ]] && "$PY" -c "import jax, sys; sys.exit(0 if jax.devices('gpu') else 1)" \
    >/dev/null 2>&1; then
    export STOCHDEPTH_REQUIRE_JAX_GPU=1
    echo "jax sees the GPU: tests/jax/test_jax_gpu.py must run"
  else
    echo "no JAX GPU backend: tests/test_jax.py runs the CPU suite, or skips without jax"
  fi
  # Many processes on the one GPU: the suite is mostly CPU-bound tests.
  [[ "$DRY" != 1 ]] && "$PY" -c "import xdist" 2>/dev/null && tests=(-n 8 tests)
  [[ "$DRY" == 1 ]] && tests=(tests/test_cuda_emulated.py tests/test_cuda_stream_args.py
    tests/test_build_info.py)
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -rfEs --durations=8 "${PYTEST_OPTS[@]}" --junitxml="$OUT/pytest.xml" \
    "${tests[@]}" ${SD_PYTEST_ARGS:-}
}
if [[ "$BUILD_OK" == 1 ]]; then
  (step sanitize 200 sanitize >"$OUT/sanitizer.log" 2>&1) &
  SAN_PID=$!
  step pytest 200 run_pytest
  wait "$SAN_PID"
  SAN_RC=$? # 3: no sanitizer on this machine, NOT RUN in the table, not a failure
  [[ $SAN_RC -ne 0 && $SAN_RC -ne 3 ]] && FAILED=1
  echo
  echo "==== [sanitize] output (run beside pytest)"
  cat "$OUT/sanitizer.log"
else
  printf '%s\tNOT RUN\tno build\n' pytest sanitize >>"$STEPS"
fi


# ---- 5. the table, last: on stdout and in $OUT/gpu_table.txt
"$PY" benchmarks/gpu_table.py "$OUT" "$DRY" | tee "$OUT/gpu_table.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || FAILED=1
# Let the log's tee write everything before the script ends, 5 s at most (a process a timed-out
# step left behind may still hold the pipe open).
exec >&- 2>&-
for _ in {1..50}; do
  kill -0 "$TEE_PID" 2>/dev/null || break
  sleep 0.1
done
exit "$FAILED"
