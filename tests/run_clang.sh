#!/usr/bin/env bash
# The C library and its C tests built by clang (plain Release build, LLVM's
# OpenMP runtime), run by ctest, and a check that clang's library gives the
# same bits as the reference build's (tests/run_all.sh's first build, GCC in
# CI): test_isa's hashes of every output of its fixed cases (tests/c/test_isa.c:
# LayerNorm and RMSNorm, plain and fused, forward and backward, GroupNorm and
# BatchNorm forward and backward; every dtype), written by both builds' ctest
# under each instruction set (default, avx2, generic), must agree file by file.
#
# Usage: tests/run_clang.sh
# Environment:
#   PN_TEST_BUILD     the reference build (default build/test); when it has
#                     no test_isa, the library and test_isa are built there
#                     with the default compiler
#   PN_CLANG_BUILD    where clang's build goes (default build/clang)
#   CLANG             the compiler (default clang)
#   PN_CLANG_STRICT=1 fail instead of skipping when clang with OpenMP cannot
#                     be found or installed
# clang and libomp are installed with apt-get where missing (tests/apt_install.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc 2>/dev/null || echo 2)
ref=${PN_TEST_BUILD:-$repo/build/test}
out=${PN_CLANG_BUILD:-$repo/build/clang}
CLANG=${CLANG:-clang}
t0=$SECONDS
source "$repo/tests/apt_install.sh"

clang_openmp_ok() {   # clang builds and runs an OpenMP program
  command -v "$CLANG" >/dev/null 2>&1 || return 1
  local d rc; d=$(mktemp -d)
  printf '#include <omp.h>\nint main(void) { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n > 0 ? 0 : 1; }\n' > "$d/o.c"
  "$CLANG" -fopenmp "$d/o.c" -o "$d/o" >/dev/null 2>&1 && "$d/o"; rc=$?
  rm -rf "$d"; return $rc
}
if ! clang_openmp_ok; then
  apt_install clang libomp-dev || true
fi
if ! clang_openmp_ok; then
  echo "!!! SKIPPED: the clang build: clang with OpenMP could not be found or installed (apt-get install clang libomp-dev)"
  [ "${PN_CLANG_STRICT:-0}" = 1 ] && exit 1
  exit 0
fi
echo "   $("$CLANG" --version | head -1)"

# 1. clang's build and its ctest (the C tests only: no CUDA library). The
#    token norms' numeric tests run under the ISA the library picks; their
#    repeats forced down to generic are left out (on 2 cores: ctest's 229
#    CPU seconds become 140): test_isa's hashes show those outputs
#    bit-identical to the picked ISA's here (isa_compare_*) and to the
#    reference build's (below), where the repeats run.
cmake -S "$repo" -B "$out" -DCMAKE_C_COMPILER="$CLANG" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=ON -DPYNORM_CUDA=OFF >/dev/null
cmake --build "$out" -j "$jobs" >/dev/null
echo "   built in $((SECONDS - t0)) s"
ctest --test-dir "$out" --output-on-failure -j "$jobs" -L cpu \
      -E '^(layernorm|rmsnorm|determinism)_isa_generic$'

# 2. the same bits as the reference build
if [ ! -x "$ref/tests/c/pn_test_isa" ]; then
  echo "   no test_isa in $ref: building the library and test_isa there"
  cmake -S "$repo" -B "$ref" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >/dev/null
  cmake --build "$ref" -j "$jobs" --target pn_test_isa >/dev/null
fi
ref_cc=$(sed -n 's/^CMAKE_C_COMPILER:[A-Z]*=//p' "$ref/CMakeCache.txt")
echo "   reference build $ref: $("$ref_cc" --version | head -1)"
case "$("$ref_cc" --version | head -1)" in
  *clang*) echo "   !!! the reference build is clang's too: this compares clang with clang" ;;
esac
failed=0
for isa in default avx2 generic; do
  a="$ref/tests/c/isa_hashes/$isa.txt"
  b="$out/tests/c/isa_hashes/$isa.txt"
  if [ ! -s "$a" ]; then
    mkdir -p "$(dirname "$a")"
    envs=(); [ "$isa" != default ] && envs=(PYNORM_ISA=$isa)
    (cd "$ref/tests/c" && env "${envs[@]}" OMP_WAIT_POLICY=PASSIVE ./pn_test_isa write "$a" >/dev/null)
  fi
  if log=$("$out/tests/c/pn_test_isa" compare "$a" "$b" 2>&1); then
    echo "   $isa: $(echo "$log" | grep '^ok' | tail -1)"
  else
    echo "   FAILED ($isa): clang's build and the reference build differ:"
    echo "$log" | grep -v '^ok' | head -40
    failed=1
  fi
done
echo "   clang step: $((SECONDS - t0)) s"
exit $failed
