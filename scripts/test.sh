#!/usr/bin/env bash
# Installs what kiln needs, builds it (and the fuzzers), and runs the whole test suite (unit, sanitizer, fuzz
# smoke and end-to-end tests against PyTorch, the JS tokenizers and llama.cpp). CI runs exactly this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
# One device architecture (Hopper, the GPU the project is lent) keeps nvcc's share of the CI build down; a plain
# `cmake -B build` also compiles for Ampere.
cmake -B build -DCMAKE_BUILD_TYPE=Release "-DKILN_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" >/dev/null
cmake --build build -j"$(nproc)"
# The libFuzzer targets (clang, ASan + UBSan): built here so ctest's fuzz.* smoke runs (2000 executions each) run.
KILN_JOBS="$(nproc)" bash scripts/fuzz.sh -runs=1 >/dev/null
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 600
