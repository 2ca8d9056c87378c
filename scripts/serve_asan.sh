#!/usr/bin/env bash
# kiln serve built with AddressSanitizer and UBSan (no CUDA, no tests: build-asan/), then the robustness loop of
# tests/serve/robustness.mjs against it: 10,000 hostile requests, each a 4xx, the server alive and exact afterwards,
# and no sanitizer report (any report aborts the server, which the loop sees). Too slow for CI (a second full build);
# run it after changes to serve/.
# usage: bash scripts/serve_asan.sh [REQUESTS (default 10000)]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKILN_CUDA=OFF -DKILN_BUILD_TESTS=OFF \
  "-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_EXE_LINKER_FLAGS=$flags" >/dev/null
cmake --build build-asan -j"$(nproc)" --target kiln
# Leak checking is off: the server exits through a signal handler with the model's arenas still mapped.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1" UBSAN_OPTIONS="print_stacktrace=1"
node tests/serve/robustness.mjs build-asan/kiln build-asan/serve_robustness "${1:-10000}"
