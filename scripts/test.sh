#!/usr/bin/env bash
# Installs what kiln needs, builds it, and runs the whole test suite (unit, sanitizer and end-to-end tests
# against PyTorch and the gpt-3-encoder peer). CI runs exactly this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 600
