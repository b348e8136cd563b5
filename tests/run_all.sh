#!/usr/bin/env bash
# Every test of pynorm, after `pip install ".[test]" torch==2.13.0`:
#   1. the C library, the C tests and (where nvcc exists) the CUDA library, run by ctest
#      (among them: clients of an installed copy through find_package, pkg-config and
#      examples/; pkg-config is installed with apt-get where missing);
#   2. the library and the C tests built by clang, run by ctest, and the same bits as
#      build 1's (tests/run_clang.sh; clang and libomp installed with apt-get where missing);
#   3. the library and the C tests cross-built for aarch64, run by ctest under qemu-user,
#      and the same bits as build 1's generic ISA (tests/run_aarch64.sh; the cross
#      compiler and qemu-user installed with apt-get where missing);
#   4. the same C tests built with AddressSanitizer + UndefinedBehaviorSanitizer;
#   5. the pytest suite, against the installed package;
#   6. the reliability checks (tests/run_reliability.sh): bounded libFuzzer runs,
#      valgrind memcheck and ThreadSanitizer (their tools are installed with
#      apt-get where missing; PN_FUZZ_SECONDS sets the fuzzing time, default 60).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc 2>/dev/null || echo 2)
source "$repo/tests/apt_install.sh"

if ! command -v pkg-config >/dev/null 2>&1; then
  apt_install pkg-config ||
    echo "!!! pkg-config could not be installed: ctest skips the pkg-config tests (apt-get install pkg-config)"
fi

# Without a GPU the CUDA tests cannot run: this build only has to show that the
# CUDA library and its tests compile, and one virtual architecture (PTX) shows
# that (the pip install before this built the library for every target).
cuda_arch=()
if command -v nvcc >/dev/null 2>&1 && ! nvidia-smi -L >/dev/null 2>&1 && [ -z "${CUDAARCHS:-}" ]; then
  cuda_arch=(-DCMAKE_CUDA_ARCHITECTURES=90-virtual)
fi

echo "== C tests (ctest)"
cmake -S "$repo" -B "$repo/build/test" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON "${cuda_arch[@]}"
cmake --build "$repo/build/test" -j "$jobs"
ctest --test-dir "$repo/build/test" --output-on-failure -j "$jobs"

echo "== C tests built by clang (ctest), and the same bits as the build above"
PN_TEST_BUILD="$repo/build/test" bash "$repo/tests/run_clang.sh"

echo "== C tests cross-built for aarch64, run under qemu-user (ctest), and the same bits as the build above"
PN_TEST_BUILD="$repo/build/test" bash "$repo/tests/run_aarch64.sh"

echo "== C tests under ASan + UBSan (ctest)"
cmake -S "$repo" -B "$repo/build/asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=ON \
      -DPYNORM_SANITIZE=ON -DPYNORM_CUDA=OFF
cmake --build "$repo/build/asan" -j "$jobs"
ctest --test-dir "$repo/build/asan" --output-on-failure -j "$jobs" -L cpu

echo "== Python tests (pytest, installed package)"
# from tests/: the installed package itself, Python files included. One worker per core
# (at most 4: each imports torch), a test file per worker (module fixtures run once).
workers=$(( jobs < 4 ? jobs : 4 ))
(cd "$repo/tests" && python3 -m pytest -q -n "$workers" --dist loadfile)

echo "== Reliability: fuzzing, valgrind, ThreadSanitizer"
PN_TEST_BUILD="$repo/build/test" bash "$repo/tests/run_reliability.sh"
