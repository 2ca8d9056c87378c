// cuda::argmax_rows (kernels/argmax.h): one block per row, each thread scanning a strided slice, then a
// warp-shuffle and shared-memory reduction under the same ordering (greater value, else lower index).
#include <climits>

#include "kernels/argmax.h"
#include "kernels/cuda/simt.cuh"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;

// (v, i) beats (bv, bi): a greater value, or an equal one at a lower index. bi == INT_MAX means "none yet",
// which any non-NaN value beats (-inf included, as in the host rule).
KILN_DEVICE bool beats(float v, int i, float bv, int bi) {
  if (i == INT_MAX) return false;
  if (bi == INT_MAX) return !(v != v);
  return v > bv || (v == bv && i < bi);
}

KILN_GLOBAL void argmax_kernel(int32_t* out, const float* x, int n, int64_t ld) {
  const float* row = x + int64_t(blockIdx.x) * ld;
  float bv = 0.0f;
  int bi = INT_MAX;
  for (int i = int(threadIdx.x); i < n; i += kThreads)
    if (beats(row[i], i, bv, bi)) bv = row[i], bi = i;
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, bv, o);
    const int i = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(v, i, bv, bi)) bv = v, bi = i;
  }
  float* sv = simt::dynamic_smem<float>();
  int* si = reinterpret_cast<int*>(sv + kThreads / 32);
  if (simt::lane_id() == 0) sv[simt::warp_id()] = bv, si[simt::warp_id()] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; w++)
      if (beats(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
    out[blockIdx.x] = bi == INT_MAX ? 0 : bi;
  }
}

}  // namespace

void argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld, void* stream) {
  if (rows <= 0) return;
  simt::launch(argmax_kernel, dim3(unsigned(rows)), dim3(kThreads), size_t(kThreads / 32) * 8,
               static_cast<cudaStream_t>(stream), out, x, n, ld);
}

}  // namespace kiln::cuda
