#!/usr/bin/env bash
# pynorm's reliability checks beyond the unit tests (docs/reliability.md):
#
#   fuzz      libFuzzer over the C API (tests/fuzz/fuzz_token.c: the token norms,
#             tests/fuzz/fuzz_spatial.c: GroupNorm and BatchNorm), built by
#             clang with AddressSanitizer + UndefinedBehaviorSanitizer, from the
#             seed corpora tests/fuzz/corpus*, for PN_FUZZ_SECONDS (default 60)
#             in all, split over the two harnesses and the instruction sets the
#             library can pick (default, avx2, generic)
#   valgrind  memcheck (zero errors, zero leaks) over the C test programs that
#             are fast enough for it: test_reliability_calls (every code path
#             on modest sizes, under avx2 - valgrind has no AVX-512 - and
#             generic), test_reliability_sizes, test_reliability_omp,
#             test_errors and the fuzz corpora replayed
#   tsan      ThreadSanitizer over the threaded C tests: clang + LLVM's libomp
#             with its archer tool (GCC's libgomp is not TSan-instrumented)
#
# Usage: tests/run_reliability.sh [fuzz] [valgrind] [tsan]     (default: all three)
# Environment:
#   PN_FUZZ_SECONDS      total fuzzing time (60); 0 skips the fuzzing runs
#   PN_TEST_BUILD        a build of the C tests to reuse for valgrind
#                        (default build/test, the one tests/run_all.sh makes;
#                        built under build/reliability/valgrind when absent)
#   PN_RELIABILITY_BUILD where the clang builds go (build/reliability)
#   PN_RELIABILITY_STRICT=1  a step whose tools cannot be installed fails
#                        instead of being skipped
# Missing tools (clang, libFuzzer, libomp, valgrind) are installed with
# apt-get when possible (as root, or through sudo); a step whose tools cannot
# be installed is skipped with a loud message.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc 2>/dev/null || echo 2)
out=${PN_RELIABILITY_BUILD:-$repo/build/reliability}
test_build=${PN_TEST_BUILD:-$repo/build/test}
fuzz_seconds=${PN_FUZZ_SECONDS:-60}
strict=${PN_RELIABILITY_STRICT:-0}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(fuzz valgrind tsan)
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE   # idle OpenMP threads sleep: 2 cores, several teams
failed=()
skipped=()
t_all=$SECONDS

say() { printf '%s\n' "$*"; }
loud_skip() {
  say ""
  say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  say "!!! SKIPPED: $1"
  say "!!! $2"
  say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  say ""
  skipped+=("$1")
  [ "$strict" = 1 ] && failed+=("$1 (tools missing, PN_RELIABILITY_STRICT=1)")
}

source "$repo/tests/apt_install.sh"   # apt_install pkg... : 0 when installed

CLANG=${CLANG:-clang}
clang_fuzzer_ok() {   # clang can build a libFuzzer target
  command -v "$CLANG" >/dev/null 2>&1 || return 1
  local d; d=$(mktemp -d)
  printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' > "$d/f.c"
  "$CLANG" -fsanitize=fuzzer,address "$d/f.c" -o "$d/f" >/dev/null 2>&1; local rc=$?
  rm -rf "$d"; return $rc
}
clang_openmp_ok() {   # clang can build and run OpenMP code (libomp)
  command -v "$CLANG" >/dev/null 2>&1 || return 1
  local d; d=$(mktemp -d)
  printf '#include <omp.h>\nint main(void) { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n > 0 ? 0 : 1; }\n' > "$d/o.c"
  "$CLANG" -fopenmp "$d/o.c" -o "$d/o" >/dev/null 2>&1 && "$d/o"; local rc=$?
  rm -rf "$d"; return $rc
}
ensure_clang() {
  if clang_fuzzer_ok && clang_openmp_ok; then return 0; fi
  apt_install clang libomp-dev || true
  if ! clang_fuzzer_ok; then   # libFuzzer lives in clang's runtime package on some releases
    local v; v=$("$CLANG" --version 2>/dev/null | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
    [ -n "$v" ] && apt_install "libclang-rt-$v-dev" || true
  fi
  clang_fuzzer_ok && clang_openmp_ok
}

# ---------------------------------------------------------------------------
step_fuzz() {
  local t0=$SECONDS
  say "== fuzz: libFuzzer over the C API (clang, ASan + UBSan), ${fuzz_seconds} s in all"
  if ! ensure_clang; then
    loud_skip "fuzz" "clang with libFuzzer and libomp could not be found or installed (apt-get install clang libomp-dev)"
    return
  fi
  local bins
  bins=$(bash "$repo/tests/fuzz/build.sh" "$out/fuzz" | tail -1) || { failed+=("fuzz (build)"); return; }
  say "   built $bins in $((SECONDS - t0)) s"
  export LSAN_OPTIONS="suppressions=$repo/tests/fuzz/lsan.supp:print_suppressions=0"
  local art="$out/fuzz-artifacts" h seeds corpus total_execs=0 ok=1
  rm -rf "$art"; mkdir -p "$art"
  # two harnesses, each from its seed corpus, for the three instruction sets
  local per=$(( fuzz_seconds / 6 ))
  if [ "$fuzz_seconds" -gt 0 ] && [ "$per" -lt 1 ]; then per=1; fi
  for h in token spatial; do
    local bin="$out/fuzz/fuzz_$h"
    seeds="$repo/tests/fuzz/corpus"; [ $h = spatial ] && seeds="$repo/tests/fuzz/corpus_spatial"
    corpus="$out/fuzz-corpus-$h"
    rm -rf "$corpus"; mkdir -p "$corpus"; cp "$seeds"/* "$corpus"/
    # the seeds first, on their own: every seed is a regression test
    if ! "$bin" -runs=0 -artifact_prefix="$art/$h-seeds-" "$seeds" >"$out/fuzz-$h-seeds.log" 2>&1; then
      say "   FAILED ($h) on the seed corpus:"; grep -v '^#\|^INFO\|^    #[0-9]' "$out/fuzz-$h-seeds.log" | tail -40
      ok=0; continue
    fi
    local isa
    for isa in default avx2 generic; do
      [ "$fuzz_seconds" -le 0 ] && break
      local log="$out/fuzz-$h-$isa.log" envs=()
      [ "$isa" != default ] && envs=(PYNORM_ISA=$isa)
      env "${envs[@]}" "$bin" -max_total_time="$per" -max_len=512 -timeout=30 -rss_limit_mb=4096 -seed=1 \
          -print_final_stats=1 -artifact_prefix="$art/$h-$isa-" "$corpus" >"$log" 2>&1
      local rc=$? execs
      execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
      total_execs=$(( total_execs + ${execs:-0} ))
      say "   $h, isa=$isa: ${execs:-?} executions in ${per} s (rc $rc)"
      if [ $rc != 0 ]; then
        ok=0
        say "   FAILED ($h, isa=$isa): the input is in $art/; the report:"
        grep -v '^#[0-9]\|^INFO\|^    #[0-9]' "$log" | tail -40
      fi
    done
    say "   $h: corpus grew from $(ls "$seeds" | wc -l) to $(ls "$corpus" | wc -l) inputs"
  done
  say "   fuzz: $total_execs executions in all"
  [ $ok = 1 ] || failed+=("fuzz")
  say "   fuzz step: $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------
step_valgrind() {
  local t0=$SECONDS
  say "== valgrind memcheck over the C tests"
  if ! command -v valgrind >/dev/null 2>&1; then
    apt_install valgrind || true
  fi
  if ! command -v valgrind >/dev/null 2>&1; then
    loud_skip "valgrind" "valgrind could not be found or installed (apt-get install valgrind)"
    return
  fi
  local bdir="$test_build"
  local targets=(pn_test_reliability_calls pn_test_reliability_sizes pn_test_reliability_omp pn_test_errors pn_fuzz_replay
                 pn_fuzz_spatial_replay)
  local have=1 t
  for t in "${targets[@]}"; do [ -x "$bdir/tests/c/$t" ] || have=0; done
  if [ $have = 0 ]; then
    bdir="$out/valgrind"
    say "   no C tests in $test_build: building them in $bdir"
    cmake -S "$repo" -B "$bdir" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON -DPYNORM_CUDA=OFF >/dev/null &&
      cmake --build "$bdir" -j "$jobs" --target "${targets[@]}" >/dev/null || { failed+=("valgrind (build)"); return; }
  else
    cmake --build "$bdir" -j "$jobs" --target "${targets[@]}" >/dev/null 2>&1 || true   # up to date
  fi
  say "   C tests from $bdir ($((SECONDS - t0)) s)"
  local vg=(valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect,possible
            --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes
            --suppressions="$repo/tests/valgrind.supp")
  local runs=(
    "::pn_test_reliability_calls"
    "PYNORM_ISA=generic::pn_test_reliability_calls --quick"
    "::pn_test_reliability_sizes"
    "::pn_test_reliability_omp"
    "::pn_test_errors"
  )
  local r envs cmd t1 log rc ok=1
  for r in "${runs[@]}"; do
    envs=${r%%::*}; cmd=${r#*::}; t1=$SECONDS; log="$out/valgrind-$(echo "$envs $cmd" | tr -c 'a-zA-Z0-9\n' '_').log"
    # shellcheck disable=SC2086
    (cd "$bdir/tests/c" && env $envs "${vg[@]}" ./$cmd) >"$log" 2>&1; rc=$?
    say "   ${envs:+$envs }$cmd: rc $rc, $(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -1) ($((SECONDS - t1)) s)"
    if [ $rc != 0 ]; then ok=0; grep -v '^ok ' "$log" | tail -40; fi
  done
  local h
  for h in "pn_fuzz_replay:corpus" "pn_fuzz_spatial_replay:corpus_spatial"; do
    t1=$SECONDS; log="$out/valgrind-${h%%:*}.log"
    (cd "$bdir/tests/c" && "${vg[@]}" ./${h%%:*} "$repo"/tests/fuzz/${h#*:}/*) >"$log" 2>&1; rc=$?
    say "   ${h%%:*} (tests/fuzz/${h#*:}): rc $rc, $(tail -1 "$log") ($((SECONDS - t1)) s)"
    if [ $rc != 0 ]; then ok=0; tail -40 "$log"; fi
  done
  [ $ok = 1 ] || failed+=("valgrind")
  say "   valgrind step: $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------
step_tsan() {
  local t0=$SECONDS
  say "== ThreadSanitizer over the threaded C tests (clang + libomp + archer)"
  if ! ensure_clang; then
    loud_skip "tsan" "clang and libomp could not be found or installed (apt-get install clang libomp-dev)"
    return
  fi
  # archer: libomp's OMPT tool that tells TSan about OpenMP's synchronization
  local archer
  archer=$("$CLANG" -print-file-name=libarcher.so 2>/dev/null)
  if [ ! -f "$archer" ]; then
    archer=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | sort -V | tail -1)
  fi
  if [ ! -f "$archer" ]; then
    loud_skip "tsan" "libarcher.so (LLVM OpenMP's TSan support, package libomp-dev) not found: without it TSan reports false races inside OpenMP"
    return
  fi
  local bdir="$out/tsan" targets=(pn_test_reliability_omp pn_test_reliability_calls)
  if [ ! -f "$bdir/CMakeCache.txt" ]; then
    cmake -S "$repo" -B "$bdir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER="$CLANG" \
          -DCMAKE_C_FLAGS="-fsanitize=thread -g" -DPYNORM_OPT=-O1 -DPYNORM_CUDA=OFF -DBUILD_TESTING=ON >/dev/null ||
      { failed+=("tsan (configure)"); return; }
  fi
  cmake --build "$bdir" -j "$jobs" --target "${targets[@]}" >/dev/null || { failed+=("tsan (build)"); return; }
  say "   built in $((SECONDS - t0)) s (archer: $archer)"
  local runs=("pn_test_reliability_omp" "pn_test_reliability_calls --quick") r t1 log rc ok=1
  for r in "${runs[@]}"; do
    t1=$SECONDS; log="$out/tsan-$(echo "$r" | tr -c 'a-zA-Z0-9\n' '_').log"
    # shellcheck disable=SC2086
    (cd "$bdir/tests/c" && OMP_TOOL_LIBRARIES="$archer" \
       TSAN_OPTIONS="halt_on_error=1 exitcode=66 ignore_noninstrumented_modules=1 second_deadlock_stack=1" \
       ./$r) >"$log" 2>&1; rc=$?
    say "   $r: rc $rc, $(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -1) ($((SECONDS - t1)) s)"
    if [ $rc != 0 ]; then ok=0; grep -v '^ok ' "$log" | tail -60; fi
  done
  [ $ok = 1 ] || failed+=("tsan")
  say "   tsan step: $((SECONDS - t0)) s"
}

for s in "${steps[@]}"; do
  case "$s" in
    fuzz) step_fuzz ;;
    valgrind) step_valgrind ;;
    tsan) step_tsan ;;
    *) say "unknown step: $s (fuzz, valgrind, tsan)"; exit 2 ;;
  esac
done

say "== reliability: $((SECONDS - t_all)) s in all"
[ ${#skipped[@]} -gt 0 ] && say "   SKIPPED: ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
  say "   FAILED: ${failed[*]}"
  exit 1
fi
say "   all passed"
