#!/usr/bin/env bash
# Run on the development machine before a GPU session: the GPU machine has CUDA, CMake, g++ and PyTorch but no
# package registry, so the Debian packages kiln builds against (OpenBLAS, nlohmann-json, CLI11, GoogleTest) are
# downloaded here into .device/debs (git-ignored, ~13 MB) to travel with the `device` tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/debs
cd .device/debs
apt-get download libopenblas0-openmp libopenblas-openmp-dev libopenblas-dev libopenblas0 libgfortran5 \
  nlohmann-json3-dev libcli11-dev libgtest-dev 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
ls -1 *.deb | wc -l | xargs echo "gpu_bundle: debs in .device/debs:"
