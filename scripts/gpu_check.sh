#!/usr/bin/env bash
# One GPU session's checks in one command (run on the GPU machine from the repository root, with .device carried;
# see scripts/gpu_bundle.sh). Builds the CUDA backend for the machine's GPU, then:
#   1. the backend test suite on the device (every CUDA op against the CPU reference, the whole model, the decoder)
#   2. the bf16 GPU training run against the fp32 CPU run (tests/e2e/gpu_train_tracks_cpu.py)
#   3. compute-sanitizer memcheck and racecheck on the attention kernels
#   4. the benchmarks beside PyTorch (bench/gpu_vs_torch.sh, including attention)
# Each step's output goes to $OUT (default ./gpu-out) and the run goes on after a failed step.
# usage: bash scripts/gpu_check.sh [tests|sanitize|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
root="$PWD/.device/root"
arch=x86_64-linux-gnu
mkdir -p "$root"
for f in .device/debs/*.deb; do dpkg -x "$f" "$root"; done
export LD_LIBRARY_PATH="$root/usr/lib/$arch:$root/usr/lib/$arch/openblas-openmp:${LD_LIBRARY_PATH:-}"
sm=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
gencode="-gencode=arch=compute_${sm}a,code=sm_${sm}a"
[ "$sm" -lt 90 ] && gencode="-gencode=arch=compute_${sm},code=sm_${sm}"
{
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKILN_CUDA=ON -DCMAKE_PREFIX_PATH="$root/usr" \
    -DKILN_OPENBLAS="$root/usr/lib/$arch/openblas-openmp/libopenblas.so.0" \
    -DKILN_CBLAS_INCLUDE="$root/usr/include/$arch/openblas-openmp" -DKILN_CUDA_GENCODE="$gencode" &&
  cmake --build build-gpu -j"$(nproc)" --target kiln kiln_gpu_tests kiln_ops_tests cuda_attention_bench
} > "$out/build.txt" 2>&1 || { tail -40 "$out/build.txt"; exit 1; }
echo "gpu_check: built for sm_$sm"

if [ "$what" = all ] || [ "$what" = tests ]; then
  build-gpu/tests/kiln_gpu_tests > "$out/gpu_tests.txt" 2>&1
  tail -3 "$out/gpu_tests.txt"
  python3 tests/e2e/gpu_train_tracks_cpu.py build-gpu/kiln build-gpu/kiln /tmp/kiln_e2e > "$out/train_tracks.txt" 2>&1
  grep -v '^step' "$out/train_tracks.txt" | tail -5
  # The mixture-of-experts ops (kernels/cuda/moe.cu) against the reference, and a tiny Qwen3-MoE trained on the GPU.
  build-gpu/tests/kiln_ops_tests --gtest_filter='*moe*:*grouped*' > "$out/moe_ops.txt" 2>&1
  tail -3 "$out/moe_ops.txt"
  python3 tests/e2e/gpu_moe_train_tracks_cpu.py build-gpu/kiln build-gpu/kiln /tmp/kiln_e2e_moe > "$out/moe_train_tracks.txt" 2>&1
  grep -v '^step' "$out/moe_train_tracks.txt" | tail -4
fi
if [ "$what" = all ] || [ "$what" = sanitize ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 build-gpu/tests/kiln_gpu_tests \
      --gtest_filter='AttentionGpu.*:DecodeAttentionGpu.*' > "$out/$tool.txt" 2>&1
    echo "gpu_check: compute-sanitizer $tool exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$tool.txt" | tail -1)"
    compute-sanitizer --tool "$tool" --error-exitcode 1 build-gpu/tests/kiln_ops_tests \
      --gtest_filter='*moe*cuda*:*grouped*cuda*' > "$out/moe_$tool.txt" 2>&1
    echo "gpu_check: compute-sanitizer $tool (moe ops) exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/moe_$tool.txt" | tail -1)"
  done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  KILN=build-gpu/kiln ATTN_BENCH=build-gpu/cuda_attention_bench PYTHON=python3 bash bench/gpu_vs_torch.sh \
    > "$out/bench.txt" 2>&1
  tail -40 "$out/bench.txt"
fi
