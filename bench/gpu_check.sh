#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the C and CUDA libraries, run the
# CUDA tests (ctest -L cuda, pytest tests/test_cuda.py: token and spatial
# norms), then the GPU benchmark (bench/gpu_bench.py: LayerNorm, RMSNorm and
# the spatial norms GroupNorm/InstanceNorm/BatchNorm in NCHW and NHWC, against
# torch CUDA), which prints its table and writes bench/results/<date>-<device>.md.
#
#   bash bench/gpu_check.sh            # everything
#   QUICK=1 bash bench/gpu_check.sh    # small benchmark shapes
#   SKIP_BENCH=1 / SKIP_TESTS=1        # one half only
#
# Environment: BUILD (build directory, default build-gpu), PYTHON (default
# python3), CUDA_ARCHS (CMAKE_CUDA_ARCHITECTURES; default: the library's own
# "80-real;90-real;90-virtual"). Needs nvcc, CMake >= 3.18 and ninja or make;
# the Python tests also need torch with CUDA and CuPy (they skip, with the
# reason, otherwise). Nothing is downloaded. The exit status is non-zero when
# the build or a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${BUILD:-build-gpu}
PYTHON=${PYTHON:-python3}
status=0

step() { printf '\n=== %s\n' "$*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
nvcc --version 2>/dev/null | tail -1 || echo "nvcc: not found"
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>/dev/null || echo "torch: not importable"
$PYTHON -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "cupy: not importable (tests/test_cuda.py will skip)"

step "build ($BUILD)"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
archs=()
[ -n "${CUDA_ARCHS:-}" ] && archs=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS")
if ! cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPYNORM_CUDA=ON -DBUILD_TESTING=ON "${archs[@]}"; then
  echo "configure failed"; exit 1
fi
if ! cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 4)"; then
  echo "build failed"; exit 1
fi
LIBDIR="$ROOT/$BUILD/c_src"
if [ ! -e "$LIBDIR/libpynorm_cuda.so" ]; then
  echo "libpynorm_cuda.so was not built (is nvcc on PATH? PYNORM_CUDA=ON?)"; exit 1
fi
export PYNORM_LIBRARY="$LIBDIR/libpynorm.so"
export PYNORM_CUDA_LIBRARY="$LIBDIR/libpynorm_cuda.so"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${SKIP_TESTS:-}" ]; then
  step "ctest -L cuda"
  ctest --test-dir "$BUILD" -L cuda --output-on-failure || status=1
  step "pytest tests/test_cuda.py"
  (cd tests && $PYTHON -m pytest -q -rs -p no:cacheprovider test_cuda.py) || status=1
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  step "benchmark"
  if [ -n "${QUICK:-}" ]; then
    $PYTHON bench/gpu_bench.py --quick || status=1
  else
    $PYTHON bench/gpu_bench.py || status=1
  fi
fi

step "done (status $status)"
exit $status
