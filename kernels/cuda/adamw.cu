// AdamW and the squared gradient norm on the GPU (formula in kernels/adamw.h).
// adamw_update: one grid-stride pass; each thread reads param, grad, m, v for 8 elements per step (16-byte
// accesses when all pointers are aligned; the n % 8 tail one by one), writes param, m, v, the bf16 copy
// param16 (when given) and, with h.zero_grad, zeros in place of the gradient. The bias corrections are
// computed once on the host in double, as kernels/cpu/adamw.cpp does.
// sum_squares: each block sums its grid-stride share into scratch[block]; one more block adds those
// partials in index order into *out. The grid depends on n only, so the result is the same on every run.
#include "kernels/adamw.h"

#include <algorithm>
#include <cmath>

#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumMaxBlocks = 1024;

struct AdamWConsts {
  float b1, b2, lr, wd, eps, gs, inv_bc1, inv_bc2;
};

template <int kN>
KILN_DEVICE void adamw_step(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t i,
                            const AdamWConsts& k, bool zero_grad) {
  float p[kN], g[kN], mi[kN], vi[kN];
  simt::load_vec<kN>(p, param + i);
  simt::load_vec<kN>(g, grad + i);
  simt::load_vec<kN>(mi, m + i);
  simt::load_vec<kN>(vi, v + i);
  for (int e = 0; e < kN; e++) {
    const float gg = g[e] * k.gs;
    mi[e] = k.b1 * mi[e] + (1.0f - k.b1) * gg;
    vi[e] = k.b2 * vi[e] + (1.0f - k.b2) * (gg * gg);
    p[e] = p[e] - k.lr * (k.wd * p[e] + (mi[e] * k.inv_bc1) / (sqrtf(vi[e] * k.inv_bc2) + k.eps));
  }
  simt::store_vec<kN>(param + i, p);
  simt::store_vec<kN>(m + i, mi);
  simt::store_vec<kN>(v + i, vi);
  if (param16) simt::store_vec<kN>(param16 + i, p);
  if (zero_grad) {
    float z[kN] = {};
    simt::store_vec<kN>(grad + i, z);
  }
}

template <int kN>
KILN_GLOBAL void __launch_bounds__(kThreads) adamw_kernel(float* param, uint16_t* param16, float* grad, float* m,
                                                          float* v, int64_t n, AdamWConsts k, bool zero_grad) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = n / kN;
  for (int64_t u = first; u < units; u += stride) adamw_step<kN>(param, param16, grad, m, v, u * kN, k, zero_grad);
  if constexpr (kN > 1)
    for (int64_t i = units * kN + first; i < n; i += stride) adamw_step<1>(param, param16, grad, m, v, i, k, zero_grad);
}

template <int kN>
KILN_GLOBAL void __launch_bounds__(kThreads) sum_squares_partial_kernel(float* partial, const float* x, int64_t n) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = n / kN;
  float s[1] = {0.0f};
  for (int64_t u = first; u < units; u += stride) {
    float a[kN];
    simt::load_vec<kN>(a, x + u * kN);
    for (int e = 0; e < kN; e++) s[0] += a[e] * a[e];
  }
  if constexpr (kN > 1)
    for (int64_t i = units * kN + first; i < n; i += stride) s[0] += x[i] * x[i];
  simt::block_sum(s, red, parity);
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

KILN_GLOBAL void __launch_bounds__(kThreads) sum_squares_final_kernel(float* out, const float* partial, int blocks) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  float s[1] = {0.0f};
  for (int i = int(threadIdx.x); i < blocks; i += int(blockDim.x)) s[0] += partial[i];
  simt::block_sum(s, red, parity);
  if (threadIdx.x == 0) *out += s[0];
}

// At least 4 vector steps per thread before another block is added, at most kSumMaxBlocks partials.
int sum_blocks(int64_t n) {
  return int(std::clamp<int64_t>((n + kThreads * 32 - 1) / (kThreads * 32), 1, kSumMaxBlocks));
}

}  // namespace

void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n, const AdamWHyper& h,
                  void* stream) {
  if (n <= 0) return;
  const AdamWConsts k{h.beta1,
                      h.beta2,
                      h.lr,
                      h.weight_decay,
                      h.eps,
                      h.grad_scale,
                      float(1.0 / (1.0 - std::pow(double(h.beta1), double(h.t)))),
                      float(1.0 / (1.0 - std::pow(double(h.beta2), double(h.t))))};
  const bool vec = simt::aligned16(param) && simt::aligned16(param16) && simt::aligned16(grad) &&
                   simt::aligned16(m) && simt::aligned16(v);
  const int64_t units = vec ? (n + 7) / 8 : n;
  const dim3 grid{unsigned(std::min<int64_t>((units + kThreads - 1) / kThreads, 8192))}, block{kThreads};
  const auto s = static_cast<cudaStream_t>(stream);
  if (vec)
    simt::launch(adamw_kernel<8>, grid, block, 0, s, param, param16, grad, m, v, n, k, h.zero_grad);
  else
    simt::launch(adamw_kernel<1>, grid, block, 0, s, param, param16, grad, m, v, n, k, h.zero_grad);
}

size_t sum_squares_scratch_floats(int64_t n) { return size_t(sum_blocks(n)); }

void sum_squares(float* out, const float* x, int64_t n, float* scratch, void* stream) {
  if (n <= 0) return;
  const int blocks = sum_blocks(n);
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t smem = simt::block_sum_smem_bytes(1);
  if (simt::aligned16(x))
    simt::launch(sum_squares_partial_kernel<8>, dim3(unsigned(blocks)), dim3(kThreads), smem, s, scratch, x, n);
  else
    simt::launch(sum_squares_partial_kernel<1>, dim3(unsigned(blocks)), dim3(kThreads), smem, s, scratch, x, n);
  simt::launch(sum_squares_final_kernel, dim3(1), dim3(kThreads), smem, s, out, static_cast<const float*>(scratch),
               blocks);
}

}  // namespace kiln::cuda
