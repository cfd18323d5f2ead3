#!/usr/bin/env bash
# The whole test suite (README "command 2"; CI runs it through .ci/run):
#   1. deps       the Debian packages below (installed when root, else the sudo line is printed)
#   2. release    Release build of everything (tests, examples, benchmarks) in build/, then ctest
#   3. asan       tests with AddressSanitizer + UndefinedBehaviorSanitizer (Debug) in build-asan/
#                 (CPU targets only: the CUDA ones are compiled by step 2), compiled by clang++, which
#                 builds the -O0 sanitizer code in about 60% of GCC's time (step 2 is the GCC build)
#   4. fuzz       libFuzzer on the safetensors reader for QLORA_FUZZ_SECONDS (default 60), build-fuzz/
#                 (in the background while step 3 runs; its output is printed after step 3's)
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
# The last line is "N passed, N failed": the ctest tests of both runs plus the fuzz run as one
# test. A configure or build that fails counts as one more failed test, so "0 failed" always
# means a clean run.
#
# Environment: QLORA_SKIP_ASAN=1, QLORA_SKIP_FUZZ=1 skip those steps; QLORA_FUZZ_SECONDS;
# QLORA_JOBS (build parallelism, default nproc); QLORA_CUDA_ARCHITECTURES (CMAKE_CUDA_ARCHITECTURES
# of the CUDA targets, e.g. 80; default CMakeLists.txt's 80;90; a build directory configured with it
# keeps it until it is configured with another). Build directories are reused (incremental).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

JOBS=${QLORA_JOBS:-$(nproc 2>/dev/null || echo 2)}
FUZZ_SECONDS=${QLORA_FUZZ_SECONDS:-60}
cuda_arch=()
[ -n "${QLORA_CUDA_ARCHITECTURES:-}" ] && cuda_arch=("-DCMAKE_CUDA_ARCHITECTURES=$QLORA_CUDA_ARCHITECTURES")
export CTEST_OUTPUT_ON_FAILURE=1
# The sanitizer (step 3) and fuzz (step 4) builds' compiler.
CLANGXX=$(command -v clang++ || command -v clang++-14 || echo clang++)

passed=0
failed=0
failures=()
timings=()
T_START=$SECONDS

banner() {
  echo
  echo "================================================================================"
  echo "== $*"
  echo "================================================================================"
}
# step_end NAME START: record how long the step took.
step_end() {
  local dt=$((SECONDS - $2))
  timings+=("$(printf '%-28s %4dm%02ds' "$1" $((dt / 60)) $((dt % 60)))")
  echo "-- $1: $((dt / 60))m$((dt % 60))s"
}
fail() { # fail WHAT: one failed test-equivalent (a step that could not produce its tests)
  failed=$((failed + 1))
  failures+=("$1")
  echo "!! FAILED: $1"
}

# cmake --build that keeps going past a failed target, so one broken file does not hide the
# results of all other tests (their ctest entries still run; the broken one reports Not Run).
build() { # build DIR [cmake --build args...]
  local dir=$1 gen keep=()
  shift
  gen=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$dir/CMakeCache.txt" 2>/dev/null)
  case "$gen" in
    Ninja*) keep=(-- -k 0) ;;
    *Makefiles*) keep=(-- -k) ;;
  esac
  cmake --build "$dir" -j "$JOBS" "$@" "${keep[@]}"
}

# run_ctest DIR LABEL: runs ctest in DIR, adds its counts to the totals.
run_ctest() {
  local dir=$1 label=$2 log="$1/ctest.log" rc line total nfail name
  (cd "$dir" && ctest --output-on-failure -j2 </dev/null) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # "100% tests passed, 0 tests failed out of 12"
  line=$(grep -E '[0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [ -n "$line" ]; then
    nfail=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
    total=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$line")
    passed=$((passed + total - nfail))
    failed=$((failed + nfail))
    if [ "$nfail" -gt 0 ]; then
      while IFS= read -r name; do failures+=("$label: $name"); done \
        < <(sed -n '/The following tests FAILED:/,$p' "$log" | grep -E '^[[:space:]]+[0-9]+ - ' | sed -E 's/^[[:space:]]+[0-9]+ - //')
    fi
  elif grep -q 'No tests were found' "$log"; then
    echo "-- $label: no tests found"
  else
    fail "$label: ctest did not report results (exit $rc)"
    return
  fi
  if [ "$rc" -ne 0 ] && [ -z "$line" ]; then fail "$label: ctest exit $rc"; fi
}

# --- 1. deps ----------------------------------------------------------------------------------
banner "1/4 deps"
t=$SECONDS
# shellcheck source=deps.sh
source scripts/deps.sh cmake g++ libeigen3-dev catch2 nlohmann-json3-dev libbenchmark-dev clang libclang-rt-14-dev
step_end "1 deps" $t

# --- 2. Release build + ctest ------------------------------------------------------------------
banner "2/4 Release build (tests, examples, benchmarks) in build/ + ctest"
t=$SECONDS
# GCC's garbage collector (for GCC, the Release build's compiler, also nvcc's host compiler): it
# collects once its heap has grown 30% past the previous collection, from a few hundred MB on.
# Letting the heap reach 1 GiB first and grow 100% between collections leaves the object files
# bit-identical and takes 10-14% less CPU (test_peft_adapter.cpp 33.4 s -> 30.0 s, qlora's
# model.cpp 105 s -> 91 s) for more memory per compile (model.cpp: 1.8 -> 2.3 GB), so only with
# at least 3 GiB of memory per build job (CI: 2 jobs).
gcc_gc=()
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)
if "${CXX:-c++}" -v 2>&1 | grep -q '^gcc version' && [ "${mem_kb:-0}" -ge $((JOBS * 3 * 1024 * 1024)) ]; then
  gc="--param=ggc-min-expand=100 --param=ggc-min-heapsize=1048576"
  gcc_gc=("-DCMAKE_CXX_FLAGS=${CXXFLAGS:-} $gc" "-DCMAKE_CUDA_FLAGS=${CUDAFLAGS:-} -Xcompiler=${gc// /,}")
  echo "-- GCC's collector: $gc"
fi
if cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
     -DQLORA_BUILD_TESTS=ON -DQLORA_BUILD_EXAMPLES=ON -DQLORA_BUILD_BENCHMARKS=ON -DQLORA_SANITIZE=OFF \
     "${cuda_arch[@]}" "${gcc_gc[@]}"; then
  build build || fail "release: build (see the compiler errors above)"
  step_end "2a release build" $t
  t=$SECONDS
  run_ctest build release
  step_end "2b release ctest" $t
else
  fail "release: cmake configure"
  step_end "2 release" $t
fi

# --- 4. libFuzzer on the safetensors reader ------------------------------------------------------
# Runs in the background while step 3 builds and runs: its build is one translation unit and the
# fuzzer one process, so on its own it would leave a core idle for both. Its output is printed after
# step 3; its counts come back through files (a subshell's variables do not).
fuzz_step() { # fuzz_step PREFIX: step 4; writes PREFIX.counts, PREFIX.failures, PREFIX.timings
  passed=0 failed=0 failures=() timings=()
  banner "4/4 libFuzzer: fuzz_safetensors for ${FUZZ_SECONDS}s in build-fuzz/"
  if [ "${QLORA_SKIP_FUZZ:-0}" = 1 ]; then
    echo "-- skipped (QLORA_SKIP_FUZZ=1)"
  elif [ ! -f tests/fuzz/CMakeLists.txt ]; then
    echo "-- skipped: tests/fuzz/CMakeLists.txt does not exist yet"
  else
    t=$SECONDS
    if CXX=$CLANGXX cmake -S . -B build-fuzz -DQLORA_FUZZ=ON \
         -DQLORA_BUILD_TESTS=OFF -DQLORA_BUILD_EXAMPLES=OFF -DQLORA_BUILD_BENCHMARKS=OFF &&
       cmake --build build-fuzz -j "$JOBS" --target fuzz_safetensors; then
      step_end "4a fuzz build" $t
      t=$SECONDS
      fuzzer=$(find build-fuzz -type f -name fuzz_safetensors -perm -u+x | head -1)
      if [ -z "$fuzzer" ]; then
        fail "fuzz: built, but no fuzz_safetensors executable found under build-fuzz/"
      else
        corpus=$(mktemp -d "${TMPDIR:-/tmp}/qlora-fuzz-corpus.XXXXXX")
        seeds=()
        for d in tests/data/safetensors tests/data/safetensors/broken; do
          [ -d "$d" ] && seeds+=("$ROOT/$d")
        done
        rm -rf build-fuzz/artifacts && mkdir -p build-fuzz/artifacts
        echo "-- $fuzzer $corpus ${seeds[*]}"
        # -timeout: one input taking 10 s is a hang; timeout(1) is a backstop for the whole run.
        timeout $((FUZZ_SECONDS + 300)) "$fuzzer" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
          -print_final_stats=1 -artifact_prefix="$ROOT/build-fuzz/artifacts/" \
          "$corpus" "${seeds[@]}" </dev/null
        rc=$?
        rm -rf "$corpus"
        if [ $rc -eq 0 ]; then
          passed=$((passed + 1))
          echo "-- fuzz: no crash in ${FUZZ_SECONDS}s"
        else
          fail "fuzz: fuzz_safetensors exit $rc (reproducer in build-fuzz/artifacts/: run $fuzzer <file>)"
          ls -l build-fuzz/artifacts/ 2>/dev/null
        fi
      fi
      step_end "4b fuzz run" $t
    else
      fail "fuzz: configure/build of fuzz_safetensors"
      step_end "4 fuzz" $t
    fi
  fi
  echo "$passed $failed" >"$1.counts"
  printf '%s\n' "${failures[@]}" >"$1.failures"
  printf '%s\n' "${timings[@]}" >"$1.timings"
}
# The sanitizers' settings, for the ASan tests (step 3) and the fuzzer (step 4).
export ASAN_OPTIONS=${ASAN_OPTIONS:-strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
fuzz_out=$(mktemp "${TMPDIR:-/tmp}/qlora-fuzz-step.XXXXXX")
fuzz_step "$fuzz_out" >"$fuzz_out.log" 2>&1 </dev/null &
fuzz_pid=$!

# --- 3. ASan + UBSan -----------------------------------------------------------------------------
banner "3/4 AddressSanitizer + UndefinedBehaviorSanitizer tests (Debug) in build-asan/ + ctest"
if [ "${QLORA_SKIP_ASAN:-0}" = 1 ]; then
  echo "-- skipped (QLORA_SKIP_ASAN=1)"
else
  t=$SECONDS
  # Without the CUDA targets: nvcc's device code is not instrumented, their tests skip without a GPU,
  # and the release build above already compiles them; here they only cost build time.
  # clang++ (installed for step 4 anyway): test_llama.cpp with -O0 + ASan + UBSan takes 117 s of CPU
  # with GCC 12 and 68 s with clang 14, and this step is all such builds (GCC at -O1 or -Og was
  # slower still). Line tables (-g1) are all the sanitizers' symbolized reports use (file:line of
  # each frame); full -g adds variables and types nobody reads here (with GCC: 38% bigger objects,
  # 7% more compile time). CXX is read when build-asan/ is first configured; a build-asan/
  # configured earlier keeps its compiler.
  if CXX=$CLANGXX cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-g1 \
       -DQLORA_SANITIZE=ON -DQLORA_CUDA=OFF \
       -DQLORA_BUILD_TESTS=ON -DQLORA_BUILD_EXAMPLES=OFF -DQLORA_BUILD_BENCHMARKS=OFF; then
    build build-asan || fail "asan: build (see the compiler errors above)"
    step_end "3a asan build" $t
    t=$SECONDS
    run_ctest build-asan asan
    step_end "3b asan ctest" $t
  else
    fail "asan: cmake configure"
    step_end "3 asan" $t
  fi
fi

# --- step 4's output and results ------------------------------------------------------------------
wait "$fuzz_pid"
cat "$fuzz_out.log"
if [ -f "$fuzz_out.counts" ]; then
  read -r fuzz_passed fuzz_failed <"$fuzz_out.counts"
  passed=$((passed + fuzz_passed))
  failed=$((failed + fuzz_failed))
  while IFS= read -r l; do [ -n "$l" ] && failures+=("$l"); done <"$fuzz_out.failures"
  while IFS= read -r l; do [ -n "$l" ] && timings+=("$l (background)"); done <"$fuzz_out.timings"
else
  fail "fuzz: the step ended without reporting results"
fi
rm -f "$fuzz_out" "$fuzz_out".*

# --- summary -------------------------------------------------------------------------------------
banner "summary"
for l in "${timings[@]}"; do echo "  $l"; done
dt=$((SECONDS - T_START))
echo "  $(printf '%-28s %4dm%02ds' total $((dt / 60)) $((dt % 60)))"
if [ ${#failures[@]} -gt 0 ]; then
  echo "failed:"
  for f in "${failures[@]}"; do echo "  $f"; done
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
