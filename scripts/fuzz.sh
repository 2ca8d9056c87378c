#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang, ASan + UBSan) and runs each for N executions from its seed
# corpus, one target at a time. Prints per target: executions, seconds, crashes (a crash, leak, timeout or
# out-of-memory input is saved under <build>/fuzz-artifacts/ and stops that target).
#   scripts/fuzz.sh [-runs=N] [--build-dir DIR] [--no-build] [TARGET...]
#     -runs=N        executions per target (default 1000000)
#     --build-dir    the clang build (default build-fuzz/; configured here when it has no CMakeCache.txt)
#     --no-build     use the binaries already built; exit 77 (ctest's "skipped") when one is missing
#     TARGET         safetensors index config tokenizer gguf request template (default: all)
# Exit status: 0 when no target crashed, 1 otherwise.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs=1000000
build="$here/build-fuzz"
do_build=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    -runs=*) runs="${1#-runs=}" ;;
    --build-dir) build="$2"; shift ;;
    --no-build) do_build=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(safetensors index config tokenizer gguf request template)

if [ "$do_build" = 1 ]; then
  if [ ! -f "$build/CMakeCache.txt" ]; then
    launcher=()
    command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ "${launcher[@]}" \
      -DKILN_CUDA=OFF -DKILN_FUZZ=ON -DKILN_BUILD_TESTS=OFF >/dev/null
  fi
  cmake --build "$build" -j"${KILN_JOBS:-2}" --target kiln_fuzzers >/dev/null
fi

for t in "${targets[@]}"; do
  if [ ! -x "$build/fuzz/fuzz_$t" ]; then
    echo "fuzz.sh: $build/fuzz/fuzz_$t is not built (scripts/fuzz.sh builds it)" >&2
    [ "$do_build" = 0 ] && exit 77
    exit 1
  fi
done

mkdir -p "$build/fuzz-artifacts"
status=0
printf '%-12s %12s %9s %8s\n' target executions seconds crashes
for t in "${targets[@]}"; do
  bin="$build/fuzz/fuzz_$t"
  # New inputs go to a scratch corpus: the committed seeds (second directory) are only read.
  work="$(mktemp -d "${TMPDIR:-/tmp}/kiln_fuzz_${t}.XXXXXX")"
  log="$build/fuzz-artifacts/$t.log"
  prefix="$build/fuzz-artifacts/$t-"
  rm -f "$prefix"crash-* "$prefix"leak-* "$prefix"timeout-* "$prefix"oom-*
  dict=()
  [ -f "$here/fuzz/dict/$t.dict" ] && dict=(-dict="$here/fuzz/dict/$t.dict")
  start=$(date +%s.%N)
  rc=0
  # -seed=1: the same run every time. -timeout: an input taking 10 s is a hang. -rss_limit_mb / -malloc_limit_mb:
  # an allocation the input's size cannot justify is a bug (a few-KB file asking for gigabytes).
  ASAN_OPTIONS="detect_leaks=1:${ASAN_OPTIONS:-}" UBSAN_OPTIONS="print_stacktrace=1:${UBSAN_OPTIONS:-}" \
    "$bin" -runs="$runs" -seed=1 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 \
    "${dict[@]}" -artifact_prefix="$prefix" "$work" "$here/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  rm -rf "$work"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(find "$build/fuzz-artifacts" -maxdepth 1 -name "$t-*" ! -name '*.log' | wc -l)
  if [ "$rc" != 0 ] && [ "$crashes" = 0 ]; then crashes=1; fi  # died without saving an input
  printf '%-12s %12s %9.1f %8s\n' "$t" "${execs:-?}" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$crashes"
  if [ "$crashes" != 0 ]; then
    status=1
    echo "  $t: see $log; inputs: $(find "$build/fuzz-artifacts" -maxdepth 1 -name "$t-*" ! -name '*.log' | tr '\n' ' ')"
    grep -m3 -E 'ERROR|invariant|runtime error|exception' "$log" | sed 's/^/  /' || true
  fi
done
exit $status
