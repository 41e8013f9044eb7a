#!/usr/bin/env bash
# The GPU check, as one command for a lent GPU machine (bare: nvcc, CMake, Python 3.12 and
# PyTorch, nothing downloadable). From the repository root:
#
#     bash benchmarks/gpu_check.sh            # device tool: carry [".whl"], timeout_s ~540
#
# 1. installs from .whl/ only the build/test packages the machine lacks or has too old;
# 2. builds stochdepth from source with CUDA (arch 90 unless SD_CUDA_ARCH says otherwise);
# 3. runs the whole pytest suite (CUDA tests enabled, STOCHDEPTH_EXPECT_CUDA=1) and, at the same
#    time, the CUDA tests under compute-sanitizer memcheck, then racecheck (a subset);
# 4. runs the GPU benchmark alone on the idle GPU (python -m stochdepth.bench --device cuda);
# 5. prints the step summary and a short benchmark table last.
# Everything goes to $OUT/gpu_check.log (and stdout); the benchmark's numbers to
# $OUT/bench_cuda.json (rewritten after every op, so a timed-out benchmark keeps what it
# measured). Exit status: 0 only if every step passed.
# Knobs (environment): SD_CUDA_ARCH (90), SD_JOBS (16), SD_PYTEST_ARGS, SD_MEMCHECK_K,
# SD_RACECHECK_K, SD_BENCH_ARGS, SD_SKIP (space-separated step names to skip).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

OUT="${OUT:-/tmp/stochdepth_gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SANLOG="$OUT/sanitizer.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

PY="${PYTHON:-python3}"
ARCH="${SD_CUDA_ARCH:-90}"
JOBS="${SD_JOBS:-16}"
SITE=/tmp/sd-site    # wheels carried in .whl/ that the machine lacks
PKG=/tmp/sd-pkg      # the stochdepth build
export PY ARCH SITE PKG  # seen by the step functions, which run in `timeout bash -c`
export PYTHONUNBUFFERED=1 STOCHDEPTH_EXPECT_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/sd-hypothesis
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

T_START=$SECONDS
SUMMARY=()
FAILED=0

# step NAME CAP_SECONDS CMD... : runs CMD under `timeout`, records rc and wall time.
step() {
  local name=$1 cap=$2
  shift 2
  if [[ " ${SD_SKIP:-} " == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-10s skipped' "$name")")
    return 0
  fi
  local t=$SECONDS
  echo
  echo "==== [$name] $(date -u +%H:%M:%S) cap ${cap}s: $*"
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
    timeout --kill-after=15 "$cap" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@"
  else
    timeout --kill-after=15 "$cap" "$@"
  fi
  local rc=$?
  local note=""
  [[ $rc -eq 124 || $rc -eq 137 ]] && note=" (TIMED OUT at ${cap}s)"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss%s' "$name" "$rc" $((SECONDS - t)) "$note")")
  [[ $rc -ne 0 ]] && FAILED=1
  return $rc
}

finish() {
  echo
  echo "==== summary ($(($SECONDS - T_START))s in all; log $LOG)"
  printf '  %s\n' "${SUMMARY[@]}"
  exit "$FAILED"
}

# ---- 0. the machine
echo "stochdepth gpu_check: $(date -u) on $(uname -n)"
PATH="$PATH:/usr/local/nvidia/bin" nvidia-smi --format=csv,noheader \
  --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem 2>&1 | sed 's/^/GPU: /'
nvcc --version | tail -2
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
  "cuda", torch.version.cuda, "| devices", torch.cuda.device_count())'

# ---- 1. wheels: only what is missing or older than pyproject.toml asks for
install_wheels() {
  local need
  need=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, os, re
from packaging.version import Version
minimum = {"scikit-build-core": "0.10", "pybind11": "2.12", "ml-dtypes": "0.3", "pytest": "8",
           "hypothesis": "6", "pluggy": "1.5", "iniconfig": "1"}
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
    echo "every build/test package is already installed"
    return 0
  fi
  echo "installing into $SITE:" $need
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $need
}
step wheels 60 install_wheels || finish

# ---- 2. build from source, CUDA required
build() {
  rm -rf "$PKG"
  STOCHDEPTH_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    --no-cache-dir --target "$PKG" \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" -Cbuild-dir=/tmp/sd-build . &&
    (cd /tmp && "$PY" - <<'EOF'
import json, stochdepth
info = stochdepth.build_info()
print(json.dumps(info))
assert stochdepth.__file__.startswith("/tmp/sd-pkg"), stochdepth.__file__
assert info["cuda_compiled"] and info["cuda_device_count"] > 0, "CUDA not compiled in or no GPU"
EOF
    )
}
step build 150 build || finish

# ---- 3. the whole suite, with the sanitizers beside it (functional runs; nothing timed)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
MEMCHECK_K="${SD_MEMCHECK_K:-bf16 or mask or raw or stream or empty or outlives or mismatch}"
RACECHECK_K="${SD_RACECHECK_K:-bf16 and (reference or misaligned)}"
sanitizers() {
  [[ " ${SD_SKIP:-} " == *" sanitize "* ]] && { echo "skipped (SD_SKIP)"; return 0; }
  [[ -n "$SAN" ]] || { echo "compute-sanitizer not found"; return 1; }
  local rc=0
  # Every tensor its own cudaMalloc, so that memcheck sees the end of each buffer.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  echo "== memcheck: -k '$MEMCHECK_K'"
  timeout --kill-after=15 100 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_drop_path_cuda.py -m "not slow" \
    -k "$MEMCHECK_K" || rc=1
  echo "== racecheck: -k '$RACECHECK_K'"
  timeout --kill-after=15 60 "$SAN" --tool racecheck --racecheck-report analysis \
    --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_drop_path_cuda.py -m "not slow" \
    -k "$RACECHECK_K" || rc=1
  return $rc
}
(
  t=$SECONDS
  sanitizers >"$SANLOG" 2>&1
  echo "$? $((SECONDS - t))" >"$OUT/.sanitizer_rc"
) &
SAN_PID=$!

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# shellcheck disable=SC2086
step pytest 160 "$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=8 "${XDIST[@]}" \
  tests ${SD_PYTEST_ARGS:-}

wait "$SAN_PID"
echo
echo "==== [sanitize] output (run beside pytest)"
cat "$SANLOG"
read -r san_rc san_s <"$OUT/.sanitizer_rc" || { san_rc=1; san_s=0; }
rm -f "$OUT/.sanitizer_rc"
SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' sanitize "$san_rc" "$san_s")")
[[ "$san_rc" -ne 0 ]] && FAILED=1

# ---- 4. the benchmark, alone on the GPU
# shellcheck disable=SC2086
step bench 200 "$PY" -m stochdepth.bench --device cuda --no-progress \
  --json "$OUT/bench_cuda.json" ${SD_BENCH_ARGS:-}

# ---- 5. a short table last
echo
echo "==== benchmark (median ms; GB/s of the bytes the op must move; % of the ceiling timed in the same rounds)"
"$PY" - "$OUT/bench_cuda.json" <<'EOF' || true
import json, sys
try:
    res = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no benchmark results: {exc}")
print(f"{'case':<14}{'op':<8}{'implementation':<46}{'ms':>8}{'GB/s':>8}{'%ceil':>8}"
      f"{'vs tv':>7}{'vs comp':>8}")
fmt = lambda v, spec: "-" if v is None else format(v, spec)
for case in res["cases"]:
    for op, o in case["ops"].items():
        c = o.get("ceiling", {})
        cache = "; FITS IN CACHE" if o.get("fits_in_cache") else ""
        print(f"{case['name']:<14}{op:<8}ceiling {fmt(c.get('gbps'), '.0f')} GB/s "
              f"({c.get('model')}){cache}")
        for r in o["rows"]:
            if r["impl"] not in ("sd_out", "sd_alloc", "sd_adapter", "tv", "compile"):
                continue
            if "error" in r:
                print(f"{case['name']:<14}{op:<8}{r['label'][:45]:<46} ERROR {r['error'][:60]}")
                continue
            sp = r.get("speedup", {})
            pct = fmt(r.get("pct_ceiling"), ".1f") + ("!" if r.get("over_ceiling") else " ")
            print(f"{case['name']:<14}{op:<8}{r['label'][:45]:<46}{r['median_ms']:8.3f}"
                  f"{r['gbps']:8.0f}{pct:>8}{fmt(sp.get('torchvision'), '.2f'):>7}"
                  f"{fmt(sp.get('compile'), '.2f'):>8}")
EOF
finish
