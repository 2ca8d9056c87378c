// LayerNorm on the GPU. A block works on one row at a time, each thread owning the same columns for every
// row (8 consecutive ones per slot when C % 8 == 0 and the rows are 16-byte aligned, else 1), so weight and
// bias are loaded into registers once per block, the row is read once, and the variance is the exact
// two-pass one (the row stays in registers). Row sums are deterministic block reductions (vec.cuh).
//
// Backward (see kernels/reference/layernorm.cpp for the formula): the same layout; each thread also keeps
// its columns' dweight/dbias sums over the rows its block visits in registers and writes them to `scratch`
// at the end (one partial row per block). A second kernel adds the partials of each column in block order
// into dweight/dbias (+=), so the result does not depend on scheduling.
#include "kernels/layernorm.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kBackwardBlocks = 1024;  // partial rows in scratch at most
constexpr int kRowsPerBackwardBlock = 8;

// Columns of a row the thread owns in slot s: kN from (threadIdx.x + s·blockDim.x)·kN.
template <int kN, int kSlots, class TO>
KILN_GLOBAL void __launch_bounds__(kMaxThreads) layernorm_forward_kernel(TO* out, float* mean, float* rstd, const float* inp, const float* weight,
                                          const float* bias, int64_t N, int C, float eps) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  const int units = C / kN;
  float w[kSlots][kN] = {}, b[kSlots][kN] = {};
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) {
      simt::load_vec<kN>(w[s], weight + u * kN);
      simt::load_vec<kN>(b[s], bias + u * kN);
    }
  }
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float* x = inp + row * C;
    float v[kSlots][kN] = {};
    float sum[1] = {0.0f};
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        simt::load_vec<kN>(v[s], x + u * kN);
        for (int i = 0; i < kN; i++) sum[0] += v[s][i];
      }
    }
    simt::block_sum(sum, red, parity);
    const float m = sum[0] / float(C);
    float sq[1] = {0.0f};
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units)
        for (int i = 0; i < kN; i++) sq[0] += (v[s][i] - m) * (v[s][i] - m);
    }
    simt::block_sum(sq, red, parity);
    const float rs = 1.0f / sqrtf(sq[0] / float(C) + eps);
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        float r[kN];
        for (int i = 0; i < kN; i++) r[i] = (v[s][i] - m) * rs * w[s][i] + b[s][i];
        simt::store_vec<kN>(out + row * C + u * kN, r);
      }
    }
    if (threadIdx.x == 0) {
      if (mean) mean[row] = m;
      if (rstd) rstd[row] = rs;
    }
  }
}

// partial: [gridDim.x][2C], dweight sums then dbias sums of the rows this block visited.
template <int kN, int kSlots, class TD>
KILN_GLOBAL void __launch_bounds__(kMaxThreads) layernorm_backward_kernel(float* dinp, float* partial, const TD* dout, const float* inp,
                                           const float* weight, const float* mean, const float* rstd, int64_t N,
                                           int C) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  const int units = C / kN;
  float w[kSlots][kN] = {}, dw[kSlots][kN] = {}, db[kSlots][kN] = {};
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) simt::load_vec<kN>(w[s], weight + u * kN);
  }
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float m = mean[row], rs = rstd[row];
    float dy[kSlots][kN] = {}, xh[kSlots][kN] = {};
    float sums[2] = {0.0f, 0.0f};  // Σ g, Σ g·xhat with g = dy·w
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        simt::load_vec<kN>(dy[s], dout + row * C + u * kN);
        simt::load_vec<kN>(xh[s], inp + row * C + u * kN);
        for (int i = 0; i < kN; i++) {
          xh[s][i] = (xh[s][i] - m) * rs;
          const float g = dy[s][i] * w[s][i];
          sums[0] += g;
          sums[1] += g * xh[s][i];
        }
      }
    }
    simt::block_sum(sums, red, parity);
    const float mg = sums[0] / float(C), mgx = sums[1] / float(C);
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        if (dinp) {
          float d[kN];
          float* p = dinp + row * C + u * kN;
          simt::load_vec<kN>(d, p);
          for (int i = 0; i < kN; i++) d[i] += rs * (dy[s][i] * w[s][i] - mg - xh[s][i] * mgx);
          simt::store_vec<kN>(p, d);
        }
        for (int i = 0; i < kN; i++) {
          dw[s][i] += dy[s][i] * xh[s][i];
          db[s][i] += dy[s][i];
        }
      }
    }
  }
  float* part = partial + int64_t(blockIdx.x) * 2 * C;
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) {
      simt::store_vec<kN>(part + u * kN, dw[s]);
      simt::store_vec<kN>(part + C + u * kN, db[s]);
    }
  }
}

// Lane = column within the block's 32 columns of [dweight | dbias], warp = stride over the partial rows;
// the warp sums are then added in warp order. Up to 32 warps (fewer for few partials).
KILN_GLOBAL void __launch_bounds__(1024)
    layernorm_param_grad_kernel(float* dweight, float* dbias, const float* partial, int blocks, int C) {
  float* red = simt::dynamic_smem<float>();
  const int col = int(blockIdx.x) * 32 + simt::lane_id();
  const int warp = simt::warp_id(), warps = int(blockDim.x) / 32;
  float s = 0.0f;
  if (col < 2 * C)
    for (int p = warp; p < blocks; p += warps) s += partial[int64_t(p) * 2 * C + col];
  red[warp * 32 + simt::lane_id()] = s;
  __syncthreads();
  if (warp == 0 && col < 2 * C) {
    float t = 0.0f;
    for (int w = 0; w < warps; w++) t += red[w * 32 + simt::lane_id()];
    float* dst = col < C ? (dweight ? dweight + col : nullptr) : (dbias ? dbias + (col - C) : nullptr);
    if (dst) *dst += t;
  }
}

int backward_blocks(int64_t N) {
  return int(std::min<int64_t>((N + kRowsPerBackwardBlock - 1) / kRowsPerBackwardBlock, kBackwardBlocks));
}

// The launch shape for rows of C columns: vector width, slots per thread, threads per block. Every thread
// keeps its columns' operands in registers (about 40 per 8-column slot in the backward), which is what
// bounds the row: one 8-column slot per thread (C <= 8192) on the vector path, up to 4 single columns per
// thread (C <= 4096) on the fallback.
struct RowShape {
  bool vec;
  int slots, threads;
};
RowShape row_shape(int C, bool aligned, const char* what) {
  KILN_CHECK(C > 0, what, ": C = ", C);
  const bool vec = aligned && C % 8 == 0;
  const int units = vec ? C / 8 : C;
  KILN_CHECK(units <= (vec ? 1 : 4) * kMaxThreads, what, ": C = ", C, " is too wide (at most ",
             (vec ? 8 : 4) * kMaxThreads, (vec ? "" : " unless C is a multiple of 8 and the rows 16-byte aligned"), ")");
  const int slots = units <= kMaxThreads ? 1 : 4;
  const int threads = ((units + slots - 1) / slots + 31) / 32 * 32;
  return {vec, slots, threads};
}

template <class TO>
void forward(TO* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int64_t N,
             int C, float eps, void* stream) {
  const bool aligned = simt::aligned16(out) && simt::aligned16(inp) && simt::aligned16(weight) && simt::aligned16(bias);
  const RowShape sh = row_shape(C, aligned, "layernorm_forward");
  if (N <= 0) return;
  const dim3 grid{unsigned(std::min<int64_t>(N, 4096))}, block{unsigned(sh.threads)};
  const size_t smem = simt::block_sum_smem_bytes(1);
  const auto s = static_cast<cudaStream_t>(stream);
  if (sh.vec)
    simt::launch(layernorm_forward_kernel<8, 1, TO>, grid, block, smem, s, out, mean, rstd, inp, weight, bias, N, C, eps);
  else if (sh.slots == 1)
    simt::launch(layernorm_forward_kernel<1, 1, TO>, grid, block, smem, s, out, mean, rstd, inp, weight, bias, N, C, eps);
  else
    simt::launch(layernorm_forward_kernel<1, 4, TO>, grid, block, smem, s, out, mean, rstd, inp, weight, bias, N, C, eps);
}

template <class TD>
void backward(float* dinp, float* dweight, float* dbias, const TD* dout, const float* inp, const float* weight,
              const float* mean, const float* rstd, int64_t N, int C, float* scratch, void* stream) {
  const bool aligned = simt::aligned16(dinp) && simt::aligned16(dout) && simt::aligned16(inp) &&
                       simt::aligned16(weight) && simt::aligned16(scratch);
  const RowShape sh = row_shape(C, aligned, "layernorm_backward");
  if (N <= 0) return;
  const int blocks = backward_blocks(N);
  const dim3 grid{unsigned(blocks)}, block{unsigned(sh.threads)};
  const size_t smem = simt::block_sum_smem_bytes(2);
  const auto s = static_cast<cudaStream_t>(stream);
  if (sh.vec)
    simt::launch(layernorm_backward_kernel<8, 1, TD>, grid, block, smem, s, dinp, scratch, dout, inp, weight, mean, rstd,
                 N, C);
  else if (sh.slots == 1)
    simt::launch(layernorm_backward_kernel<1, 1, TD>, grid, block, smem, s, dinp, scratch, dout, inp, weight, mean, rstd,
                 N, C);
  else
    simt::launch(layernorm_backward_kernel<1, 4, TD>, grid, block, smem, s, dinp, scratch, dout, inp, weight, mean, rstd,
                 N, C);
  if (dweight || dbias) {
    const int warps = std::clamp((blocks + 7) / 8, 1, 32);  // about 8 partials per thread
    simt::launch(layernorm_param_grad_kernel, dim3(unsigned((2 * C + 31) / 32)), dim3(unsigned(32 * warps)),
                 size_t(32 * warps) * sizeof(float), s, dweight, dbias, static_cast<const float*>(scratch), blocks, C);
  }
}

}  // namespace

void layernorm_forward(uint16_t* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps, void* stream) {
  forward(out, mean, rstd, inp, weight, bias, N, C, eps, stream);
}
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps, void* stream) {
  forward(out, mean, rstd, inp, weight, bias, N, C, eps, stream);
}
size_t layernorm_backward_scratch_floats(int64_t N, int C) {
  return size_t(std::max(backward_blocks(N), 1)) * 2 * size_t(std::max(C, 0));
}
void layernorm_backward(float* dinp, float* dweight, float* dbias, const uint16_t* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C,
                        float* scratch, void* stream) {
  backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, scratch, stream);
}
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C,
                        float* scratch, void* stream) {
  backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, scratch, stream);
}

}  // namespace kiln::cuda
