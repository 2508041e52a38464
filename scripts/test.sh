#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs what the tests need and runs every test: the native tests (GoogleTest under ctest) and
# the Python tests (pytest). This is the README's test command; .ci/run calls it.
# Fails if either suite fails or runs nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
JOBS=${PYSBN_JOBS:-2}

echo "== dependencies"
# torch first, pinned: a bare `torch` would pull several GB of CUDA wheels. Then the build tools
# and the test extra of pyproject.toml (keep the two lists alike) without anything that could
# replace that torch: timm and torchvision (which require torch) with --no-deps, their own
# torch-free dependencies named here.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q cython scikit-build-core ninja \
  pytest hypothesis mypy numpy onnx onnxscript matplotlib tqdm \
  pillow pyyaml huggingface_hub safetensors
$PY -m pip install -q --no-deps timm torchvision==0.28.0
if ! { [ -f /usr/include/gtest/gtest.h ] && ls /usr/lib/*/libgtest.a >/dev/null 2>&1; }; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev
fi

echo "== native tests (CUDA compiled when nvcc is found; GPU tests run only with a GPU)"
# One CUDA arch keeps this build short; the wheel below compiles the full arch list.
cmake -S . -B build/ci-native -G Ninja -DPYSBN_BUILD_TESTS=ON -DPYSBN_BUILD_PYTHON=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build build/ci-native -j "$JOBS"
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  ctest --test-dir build/ci-native --no-tests=error --output-on-failure
else
  ctest --test-dir build/ci-native -LE gpu --no-tests=error --output-on-failure
fi

echo "== install the package (pip install .; its torch requirement is met by the torch above)"
$PY -m pip install -q .

echo "== python tests"
# Run as `pytest` (importlib mode, set in pyproject): the source folder pysbn/ has no compiled
# _core and must not shadow the installed package.
pytest -q -p no:cacheprovider tests

echo "== benchmark smoke run (pysbn bench --quick; no speed assertions)"
# From outside the repo, so the installed package is the one that runs. Under a minute on
# 2 cores (about 45 s with torch.compile's caches cold: the compiled rows compile 4 times).
BENCH_DIR=$(mktemp -d)
(cd "$BENCH_DIR" && $PY -m pysbn info)
if ! (cd "$BENCH_DIR" && $PY -m pysbn bench --quick --out "$BENCH_DIR/out" \
      >"$BENCH_DIR/stdout.log" 2>"$BENCH_DIR/stderr.log"); then
  cat "$BENCH_DIR/stdout.log"; tr '\r' '\n' <"$BENCH_DIR/stderr.log" | tail -n 30
  echo "bench smoke run failed"; exit 1
fi
for f in bench.json bench.md bench.png; do
  [ -s "$BENCH_DIR/out/$f" ] || { echo "bench smoke run wrote no $f"; exit 1; }
done
tail -n 1 "$BENCH_DIR/stdout.log"
rm -rf "$BENCH_DIR"
