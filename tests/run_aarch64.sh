#!/usr/bin/env bash
# The C library and its C tests cross-built for aarch64 (GCC,
# cmake/toolchains/aarch64-linux-gnu.cmake), run by ctest under qemu-user,
# and a check that the aarch64 library gives the same bits as the reference
# x86-64 build's generic ISA (tests/run_all.sh's first build in CI): test_isa's
# hashes of every output of its fixed cases (tests/c/test_isa.c), written by
# the aarch64 ctest, must equal those the reference build writes under
# PYNORM_ISA=generic.
#
# Under the emulator ctest sets PYNORM_TEST_QUICK=1 (tests/c/testutil.h: the
# 8 MiB cases left out, large cases one dtype each), and the reference hashes
# are then written quick too. The installed-client tests (find_package,
# pkg-config, examples/) are not part of a cross build: the native build runs
# them.
#
# Usage: tests/run_aarch64.sh
# Environment:
#   PN_TEST_BUILD       the x86-64 reference build (default build/test); when it
#                       has no test_isa, the library and test_isa are built there
#   PN_AARCH64_BUILD    where the cross build goes (default build/aarch64)
#   PN_AARCH64_STRICT=1 fail instead of skipping when the cross compiler or
#                       qemu cannot be found or installed
# The cross compiler, the target's libc and libgomp, and qemu-user are
# installed with apt-get where missing (tests/apt_install.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc 2>/dev/null || echo 2)
ref=${PN_TEST_BUILD:-$repo/build/test}
out=${PN_AARCH64_BUILD:-$repo/build/aarch64}
toolchain=$repo/cmake/toolchains/aarch64-linux-gnu.cmake
sysroot=/usr/aarch64-linux-gnu
t0=$SECONDS
source "$repo/tests/apt_install.sh"

cross_ok() {   # the cross compiler builds an OpenMP program and qemu runs it
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || return 1
  local d rc; d=$(mktemp -d)
  printf '#include <omp.h>\nint main(void) { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n > 0 ? 0 : 1; }\n' > "$d/o.c"
  aarch64-linux-gnu-gcc -fopenmp "$d/o.c" -o "$d/o" >/dev/null 2>&1 && qemu-aarch64 -L "$sysroot" "$d/o"; rc=$?
  rm -rf "$d"; return $rc
}
if ! cross_ok; then
  apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user || true
fi
if ! cross_ok; then
  echo "!!! SKIPPED: the aarch64 build: the cross compiler with OpenMP or qemu-aarch64 could not be found or" \
       "installed (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user)"
  [ "${PN_AARCH64_STRICT:-0}" = 1 ] && exit 1
  exit 0
fi
echo "   $(aarch64-linux-gnu-gcc --version | head -1); $(qemu-aarch64 --version | head -1)"

# 1. the cross build (library, static library, C tests: what ctest runs) and
#    its ctest under qemu
cmake -S "$repo" -B "$out" -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_TESTING=ON >/dev/null
cmake --build "$out" -j "$jobs" >/dev/null
echo "   built in $((SECONDS - t0)) s"
t1=$SECONDS
ctest --test-dir "$out" --output-on-failure -j "$jobs" -L cpu
echo "   ctest under qemu: $((SECONDS - t1)) s"

# 2. the same bits as the reference build's generic ISA
if [ ! -x "$ref/tests/c/pn_test_isa" ]; then
  echo "   no test_isa in $ref: building the library and test_isa there"
  cmake -S "$repo" -B "$ref" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON >/dev/null
  cmake --build "$ref" -j "$jobs" --target pn_test_isa >/dev/null
fi
b="$out/tests/c/isa_hashes/default.txt"
quick=0; grep -q '^# quick' "$b" && quick=1
# (the reference's ctest writes generic.txt in full; a quick one is written
# here, each time: about 2 s)
a="$ref/tests/c/isa_hashes/generic$([ $quick = 1 ] && echo _quick).txt"
if [ ! -s "$a" ] || [ $quick = 1 ]; then
  mkdir -p "$(dirname "$a")"
  (cd "$ref/tests/c" && env PYNORM_ISA=generic PYNORM_TEST_QUICK=$quick OMP_WAIT_POLICY=PASSIVE \
     ./pn_test_isa write "$a" >/dev/null)
fi
failed=0
if log=$("$ref/tests/c/pn_test_isa" compare "$a" "$b" 2>&1); then
  echo "   x86-64 generic vs aarch64: $(echo "$log" | grep '^ok' | tail -1)"
else
  echo "   FAILED: the aarch64 build and the x86-64 reference build's generic ISA differ:"
  echo "$log" | grep -v '^ok' | head -40
  failed=1
fi
echo "   aarch64 step: $((SECONDS - t0)) s"
exit $failed
