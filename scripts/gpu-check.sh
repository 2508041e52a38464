#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# scripts/gpu-check.sh OUTDIR [--dry]
#
# The whole CUDA path proven in one short run on a GPU machine (NVIDIA H100/H200 with CUDA's
# nvcc, python, torch with CUDA, cmake, ninja, cython, scikit-build-core, pytest, hypothesis,
# timm, torchvision; no internet needed):
#   1. build   pysbn with CUDA for the local GPU only: the wheel and the native tests, in parallel
#   2. ctest   the native GPU tests (ctest -L gpu)
#   3. pytest  the GPU tests: layers, DataParallel on one GPU, process groups over NCCL and Gloo
#              (2 processes on the one GPU), torch.compile and CUDA graphs, the op set's opcheck
#              on CUDA, fused activations, no host synchronisation; and tests/test_functional.py's
#              TestCUDA
#   4. sanitize compute-sanitizer memcheck and racecheck on a short native subset
#   5. bench   the GPU rows of the benchmark protocol (--quick, eager and compiled)
# Every log and the bench JSON/Markdown go to OUTDIR (8 files at most, no sub-folders); a
# one-page summary is printed and written to OUTDIR/summary.txt. Each step has its own time
# limit, cut to what is left of the run's budget (PYSBN_GPU_BUDGET_S, default 480 s): the
# whole run stays inside 8 minutes, and a step the budget cannot reach is reported [SKIP]
# (the run then fails: rerun with the steps left, or a larger budget).
#
# Without a GPU (or with --dry) it runs a dry mode that checks its own plumbing: the CMake
# configuration with the flags it would use, the GPU gtests and pytest items it would run
# (collected, not run), the bench options, and the output layout. .ci/run runs the dry mode.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${1:?usage: scripts/gpu-check.sh OUTDIR [--dry]}
MODE=${2:-auto}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
JOBS=$(nproc 2>/dev/null || echo 4)

SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
ran() { ! grep -q '^skipped: budget spent' "$OUT/$1" 2>/dev/null; }  # ran LOG: the step was not skipped

have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

DRY=0
if [ "$MODE" = "--dry" ] || ! have_gpu; then DRY=1; fi

# The GPU pytest items (the same list in both modes).
PYTEST_ITEMS=(tests/test_gpu_layers.py "tests/test_functional.py::TestCUDA")
# A short native subset under compute-sanitizer.
SANITIZE_FILTER="CudaOps.MomentsMatchFloat64Reference:CudaOps.NormalizeMatchesFloat64Reference:CudaOps.BackwardElemtMatchesFloat64Reference:CudaOps.CompositesAreTheComposedOps"
BUILD_DIR=build/gpu-check
ARCH=native
[ "$DRY" = 1 ] && ARCH=90  # no GPU to detect: any one architecture checks the configuration

say "pysbn GPU check ($( [ "$DRY" = 1 ] && echo "DRY mode: no GPU here, plumbing only" || echo "GPU run"))"
say "  date $(date -u +%Y-%m-%dT%H:%MZ); out $OUT"
if [ "$DRY" = 0 ]; then
  say "  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
fi
say "  $($PY -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>&1)"
say "  nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not found')"

status=0
BUDGET=${PYSBN_GPU_BUDGET_S:-480}
step() {  # step NAME LIMIT_S LOG COMMAND...: runs with a time limit, logs, records the outcome
  local name=$1 limit=$2 log=$3
  shift 3
  local t0 rc left
  left=$(( START + BUDGET - $(date +%s) - 15 ))  # 15 s kept for the summary
  if [ "$left" -lt 20 ]; then
    say "[SKIP] $name: the run's ${BUDGET} s budget is spent"; echo "skipped: budget spent" >"$OUT/$log"
    status=1
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$*" >"$OUT/$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    say "[ok]   $name (${dt} s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "[TIME] $name: over its ${limit} s limit (see $log)"; status=1
  else
    say "[FAIL] $name: exit $rc (see $log)"; status=1
  fi
  return $rc
}

# ---- 1. build ------------------------------------------------------------------------------------
CONFIGURE="cmake -S . -B $BUILD_DIR -G Ninja -DPYSBN_BUILD_TESTS=ON -DPYSBN_BUILD_PYTHON=OFF \
  -DPYSBN_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH"
if [ "$DRY" = 1 ]; then
  step "configure (CUDA ON, arch $ARCH)" 120 build.log "$CONFIGURE" || true
  grep -q "pysbn: CUDA kernels ON" "$OUT/build.log" && say "       CMake: CUDA kernels ON" ||
    { say "[FAIL] CMake did not enable the CUDA kernels"; status=1; }
else
  # The native tests and the wheel build at the same time (each is mostly one long nvcc job).
  HALF=$(( JOBS > 1 ? JOBS / 2 : 1 ))
  step "build native tests and pip install . (CUDA, arch native, in parallel)" 300 build.log \
    "( $CONFIGURE && cmake --build $BUILD_DIR -j $HALF ) >$OUT/native.tmp 2>&1 & native=\$!
     CMAKE_BUILD_PARALLEL_LEVEL=$HALF PYSBN_WITH_CUDA=ON $PY -m pip install -q --no-build-isolation \
       --no-deps -Cbuild-dir=build/gpu-wheel -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=native . \
       >$OUT/pip.tmp 2>&1; wheel=\$?
     wait \$native; nat=\$?
     echo '== native tests build'; cat $OUT/native.tmp; echo '== pip install .'; cat $OUT/pip.tmp
     rm -f $OUT/native.tmp $OUT/pip.tmp
     echo \"native build exit \$nat, pip install exit \$wheel\"; [ \$nat -eq 0 ] && [ \$wheel -eq 0 ]" || true
  rm -f "$OUT/native.tmp" "$OUT/pip.tmp"
  (cd /tmp && $PY -m pysbn info) >>"$OUT/build.log" 2>&1
  grep -q "CUDA yes" "$OUT/build.log" && say "       pysbn info: CUDA yes" ||
    { say "[FAIL] the installed pysbn has no CUDA (see build.log)"; status=1; }
fi

# ---- 2. ctest -L gpu -------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  # The GPU gtests that would run: from a native build when one exists (CI builds it first).
  NATIVE=$(ls -d build/ci-native build/cuda-check 2>/dev/null | head -1)
  if [ -n "$NATIVE" ]; then
    step "list GPU gtests ($NATIVE)" 60 ctest.log "ctest --test-dir $NATIVE -N -L gpu" || true
    say "       would run $(grep -c 'Test *#' "$OUT/ctest.log") GPU gtests"
  else
    say "       (no native build here to list the GPU gtests from)"; echo "none" >"$OUT/ctest.log"
  fi
else
  step "ctest -L gpu" 120 ctest.log "ctest --test-dir $BUILD_DIR -L gpu --output-on-failure -j 4" || true
  ran ctest.log && say "       $(grep -E 'tests passed|tests failed|No tests' "$OUT/ctest.log" | tail -1)"
fi

# ---- 3. pytest -------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  step "collect the GPU pytest items" 120 pytest.log \
    "pytest -q -p no:cacheprovider --collect-only ${PYTEST_ITEMS[*]}" || true
  say "       would run $(grep -cE '::' "$OUT/pytest.log") GPU pytest items"
else
  step "pytest GPU tests (layers, NCCL/Gloo 2 procs, compile, CUDA graphs, opcheck, fused act)" 240 \
    pytest.log "pytest -q -rs -p no:cacheprovider ${PYTEST_ITEMS[*]}" || true
  ran pytest.log && say "       $(tail -1 "$OUT/pytest.log")"
fi

# ---- 4. compute-sanitizer --------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  echo "would run: compute-sanitizer --tool {memcheck,racecheck} $BUILD_DIR/tests/native/test_cuda_ops --gtest_filter=$SANITIZE_FILTER" >"$OUT/sanitizer.log"
  command -v compute-sanitizer >/dev/null 2>&1 && say "       compute-sanitizer: found" ||
    say "       compute-sanitizer: not on this machine (checked on the GPU run)"
else
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  step "compute-sanitizer memcheck + racecheck (native subset)" 120 sanitizer.log \
    "for tool in memcheck racecheck; do echo \"== \$tool\"; $SAN --tool \$tool --error-exitcode 3 \
     $BUILD_DIR/tests/native/test_cuda_ops --gtest_filter='$SANITIZE_FILTER' || exit \$?; done" || true
  ran sanitizer.log && say "       $(grep -cE '^========= (ERROR|Invalid|Race)' "$OUT/sanitizer.log") sanitizer findings"
fi

# ---- 5. bench ----------------------------------------------------------------------------------------
BENCH_TMP=$(mktemp -d)
if [ "$DRY" = 1 ]; then
  step "bench options" 60 bench.log "cd $BENCH_TMP && $PY -m pysbn bench --help" || true  # not from the source root
  for opt in --devices --quick --out; do
    grep -q -- "$opt" "$OUT/bench.log" || { say "[FAIL] bench has no $opt option"; status=1; }
  done
  echo '{"dry": true}' >"$OUT/bench.json"
  echo "(dry mode: no GPU rows)" >"$OUT/bench.md"
else
  step "bench GPU rows (--quick)" 120 bench.log \
    "cd $BENCH_TMP && $PY -m pysbn bench --devices cuda --quick --out $BENCH_TMP/out" || true
  cp "$BENCH_TMP/out/bench.json" "$OUT/bench.json" 2>/dev/null || echo '{}' >"$OUT/bench.json"
  cp "$BENCH_TMP/out/bench.md" "$OUT/bench.md" 2>/dev/null || echo "(no bench output)" >"$OUT/bench.md"
  ran bench.log && say "       $(grep -E 'geometric-mean' "$OUT/bench.md" | head -4 | tr '\n' ' ')"
fi
rm -rf "$BENCH_TMP"

# ---- output layout -----------------------------------------------------------------------------------
files=$(find "$OUT" -mindepth 1 -maxdepth 1 -type f | wc -l)
dirs=$(find "$OUT" -mindepth 1 -type d | wc -l)
if [ "$files" -gt 8 ] || [ "$dirs" -gt 0 ]; then
  say "[FAIL] output layout: $files files, $dirs folders (at most 8 files, no folders)"; status=1
fi
say "done in $(elapsed) s: $( [ $status -eq 0 ] && echo PASS || echo FAIL ); files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
