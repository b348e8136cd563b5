#!/usr/bin/env bash
# Builds the libFuzzer harnesses over pynorm's C API (fuzz_token: the token
# norms; fuzz_spatial: GroupNorm and BatchNorm):
#   tests/fuzz/build.sh [BUILD_DIR]      (default: build/fuzz)
# The library is configured with the top-level CMakeLists.txt, compiled by
# clang at -O1 with coverage instrumentation and AddressSanitizer +
# UndefinedBehaviorSanitizer (every ISA variant: the one that runs is picked
# at run time, PYNORM_ISA=generic/avx2 lowers it); the harness links the
# static library. Prints the paths of the two fuzzers on its last line.
# Needs clang with its runtime (libFuzzer) and libomp (Debian: apt-get install
# clang libomp-dev).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$repo/build/fuzz}
CLANG=${CLANG:-clang}
jobs=$(nproc 2>/dev/null || echo 2)

san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# the library: edge coverage only (comparison tracing in its inner loops would
# cost most of the run time and guides little there)
libcov="-fsanitize-coverage=inline-8bit-counters,pc-table"
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$repo" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_C_COMPILER="$CLANG" -DCMAKE_C_FLAGS="-g $libcov $san" \
        -DPYNORM_CUDA=OFF -DBUILD_TESTING=OFF -DPYNORM_SANITIZE=OFF -DPYNORM_OPT=-O1 >/dev/null
fi
cmake --build "$build" --target pynorm_static -j "$jobs" >/dev/null
for h in token spatial; do
  "$CLANG" -g -O1 -fsanitize=fuzzer $san -Wall -Wextra -I "$repo/c_src/include" \
           "$repo/tests/fuzz/fuzz_$h.c" "$build/c_src/libpynorm.a" -fopenmp -lm -o "$build/fuzz_$h"
done
echo "$build/fuzz_token $build/fuzz_spatial"
