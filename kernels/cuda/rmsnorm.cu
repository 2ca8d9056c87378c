// RMSNorm on the GPU, laid out as kernels/cuda/layernorm.cu: a block works on one group (a row, or one head
// of a row for the per-head q/k norms) at a time, each thread owning the same columns of every group (8 per
// slot on the 16-byte path), so the weight is loaded into registers once per block and the group is read once.
// The sum of squares is a deterministic block reduction (vec.cuh).
//
// Backward (kernels/reference/rmsnorm.cpp): with xhat = x·rstd and g = dy·w,
//   dx = rstd·(g − xhat·mean(g·xhat)),  dw += Σ dy·xhat.
// Each thread keeps its columns' dweight sums over the groups its block visits in registers and writes them
// to `scratch` (one partial row per block); a second kernel adds the partials in block order into dweight.
#include "kernels/rmsnorm.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kBackwardBlocks = 1024;  // partial rows in scratch at most
constexpr int kGroupsPerBackwardBlock = 8;

// Group g starts at (g / heads)·ld + (g % heads)·C, in inputs and outputs alike.
KILN_DEVICE int64_t group_offset(int64_t g, int heads, int64_t ld, int C) {
  return (g / heads) * ld + (g % heads) * int64_t(C);
}

template <int kN, int kSlots, class TI, class TO>
KILN_GLOBAL void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(TO* out, float* rstd, const TI* inp, const float* weight, int64_t groups, int C, float eps,
                           int heads, int64_t ld) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  const int units = C / kN;
  float w[kSlots][kN] = {};
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) simt::load_vec<kN>(w[s], weight + u * kN);
  }
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t off = group_offset(grp, heads, ld, C);
    float v[kSlots][kN] = {};
    float sq[1] = {0.0f};
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        simt::load_vec<kN>(v[s], inp + off + u * kN);
        for (int i = 0; i < kN; i++) sq[0] += v[s][i] * v[s][i];
      }
    }
    simt::block_sum(sq, red, parity);
    const float rs = 1.0f / sqrtf(sq[0] / float(C) + eps);
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        float r[kN];
        for (int i = 0; i < kN; i++) r[i] = (v[s][i] * rs) * w[s][i];  // Hugging Face's order
        simt::store_vec<kN>(out + off + u * kN, r);  // in place is safe: the thread read these columns
      }
    }
    if (threadIdx.x == 0 && rstd) rstd[grp] = rs;
  }
}

// partial: [gridDim.x][C], the dweight sums of the groups this block visited.
template <int kN, int kSlots, class TX, class TD, class TI>
KILN_GLOBAL void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_kernel(TX* dinp, float* partial, const TD* dout, const TI* inp, const float* weight,
                            const float* rstd, int64_t groups, int C, int accumulate, int heads, int64_t ld) {
  float* red = simt::dynamic_smem<float>();
  int parity = 0;
  const int units = C / kN;
  float w[kSlots][kN] = {}, dw[kSlots][kN] = {};
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) simt::load_vec<kN>(w[s], weight + u * kN);
  }
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t off = group_offset(grp, heads, ld, C);
    const float rs = rstd[grp];
    float dy[kSlots][kN] = {}, xh[kSlots][kN] = {};
    float sum[1] = {0.0f};  // Σ g·xhat
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        simt::load_vec<kN>(dy[s], dout + off + u * kN);
        simt::load_vec<kN>(xh[s], inp + off + u * kN);
        for (int i = 0; i < kN; i++) {
          xh[s][i] *= rs;
          sum[0] += dy[s][i] * w[s][i] * xh[s][i];
        }
      }
    }
    simt::block_sum(sum, red, parity);  // also orders every read of dout before the writes (dinp may alias it)
    const float mgx = sum[0] / float(C);
    for (int s = 0; s < kSlots; s++) {
      const int u = int(threadIdx.x) + s * int(blockDim.x);
      if (u < units) {
        if (dinp) {
          float d[kN] = {};
          TX* p = dinp + off + u * kN;
          if (accumulate) simt::load_vec<kN>(d, p);
          for (int i = 0; i < kN; i++) d[i] += rs * (dy[s][i] * w[s][i] - xh[s][i] * mgx);
          simt::store_vec<kN>(p, d);
        }
        for (int i = 0; i < kN; i++) dw[s][i] += dy[s][i] * xh[s][i];
      }
    }
  }
  float* part = partial + int64_t(blockIdx.x) * C;
  for (int s = 0; s < kSlots; s++) {
    const int u = int(threadIdx.x) + s * int(blockDim.x);
    if (u < units) simt::store_vec<kN>(part + u * kN, dw[s]);
  }
}

// Lane = column within the block's 32 columns, warp = stride over the partial rows; the warp sums are then
// added in warp order (as layernorm_param_grad_kernel).
KILN_GLOBAL void __launch_bounds__(1024) rmsnorm_weight_grad_kernel(float* dweight, const float* partial, int blocks, int C) {
  float* red = simt::dynamic_smem<float>();
  const int col = int(blockIdx.x) * 32 + simt::lane_id();
  const int warp = simt::warp_id(), warps = int(blockDim.x) / 32;
  float s = 0.0f;
  if (col < C)
    for (int p = warp; p < blocks; p += warps) s += partial[int64_t(p) * C + col];
  red[warp * 32 + simt::lane_id()] = s;
  __syncthreads();
  if (warp == 0 && col < C) {
    float t = 0.0f;
    for (int w = 0; w < warps; w++) t += red[w * 32 + simt::lane_id()];
    dweight[col] += t;
  }
}

int backward_blocks(int64_t groups) {
  return int(std::min<int64_t>((groups + kGroupsPerBackwardBlock - 1) / kGroupsPerBackwardBlock, kBackwardBlocks));
}

// Launch shape for groups of C columns (see layernorm.cu: operands stay in registers, which bounds C).
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

int64_t check_layout(int C, int heads, int64_t ld, const char* what) {
  KILN_CHECK(heads >= 1, what, ": heads = ", heads);
  const int64_t row = ld == 0 ? int64_t(heads) * C : ld;
  KILN_CHECK(row >= int64_t(heads) * C, what, ": ld = ", ld, " is shorter than heads·C = ", int64_t(heads) * C);
  return row;
}

template <class TO, class TI>
void forward(TO* out, float* rstd, const TI* inp, const float* weight, int64_t N, int C, float eps, int heads,
             int64_t ld, void* stream) {
  ld = check_layout(C, heads, ld, "rmsnorm_forward");
  const bool aligned = simt::aligned16(out) && simt::aligned16(inp) && simt::aligned16(weight) && ld % 8 == 0;
  const RowShape sh = row_shape(C, aligned, "rmsnorm_forward");
  const int64_t groups = N * heads;
  if (groups <= 0) return;
  const dim3 grid{unsigned(std::min<int64_t>(groups, 4096))}, block{unsigned(sh.threads)};
  const size_t smem = simt::block_sum_smem_bytes(1);
  const auto s = static_cast<cudaStream_t>(stream);
  if (sh.vec)
    simt::launch(rmsnorm_forward_kernel<8, 1, TI, TO>, grid, block, smem, s, out, rstd, inp, weight, groups, C, eps,
                 heads, ld);
  else if (sh.slots == 1)
    simt::launch(rmsnorm_forward_kernel<1, 1, TI, TO>, grid, block, smem, s, out, rstd, inp, weight, groups, C, eps,
                 heads, ld);
  else
    simt::launch(rmsnorm_forward_kernel<1, 4, TI, TO>, grid, block, smem, s, out, rstd, inp, weight, groups, C, eps,
                 heads, ld);
}

template <class TX, class TD, class TI>
void backward(TX* dinp, float* dweight, const TD* dout, const TI* inp, const float* weight, const float* rstd,
              int64_t N, int C, bool accumulate, int heads, int64_t ld, float* scratch, void* stream) {
  ld = check_layout(C, heads, ld, "rmsnorm_backward");
  const bool aligned = simt::aligned16(dinp) && simt::aligned16(dout) && simt::aligned16(inp) &&
                       simt::aligned16(weight) && simt::aligned16(scratch) && ld % 8 == 0;
  const RowShape sh = row_shape(C, aligned, "rmsnorm_backward");
  const int64_t groups = N * heads;
  if (groups <= 0) return;
  KILN_CHECK(scratch, "rmsnorm_backward: null scratch");
  const int blocks = backward_blocks(groups);
  const dim3 grid{unsigned(blocks)}, block{unsigned(sh.threads)};
  const size_t smem = simt::block_sum_smem_bytes(1);
  const auto s = static_cast<cudaStream_t>(stream);
  const int acc = accumulate ? 1 : 0;
  if (sh.vec)
    simt::launch(rmsnorm_backward_kernel<8, 1, TX, TD, TI>, grid, block, smem, s, dinp, scratch, dout, inp, weight,
                 rstd, groups, C, acc, heads, ld);
  else if (sh.slots == 1)
    simt::launch(rmsnorm_backward_kernel<1, 1, TX, TD, TI>, grid, block, smem, s, dinp, scratch, dout, inp, weight,
                 rstd, groups, C, acc, heads, ld);
  else
    simt::launch(rmsnorm_backward_kernel<1, 4, TX, TD, TI>, grid, block, smem, s, dinp, scratch, dout, inp, weight,
                 rstd, groups, C, acc, heads, ld);
  if (dweight) {
    const int warps = std::clamp((blocks + 7) / 8, 1, 32);  // about 8 partials per thread
    simt::launch(rmsnorm_weight_grad_kernel, dim3(unsigned((C + 31) / 32)), dim3(unsigned(32 * warps)),
                 size_t(32 * warps) * sizeof(float), s, dweight, static_cast<const float*>(scratch), blocks, C);
  }
}

}  // namespace

void rmsnorm_forward(uint16_t* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     void* stream) {
  forward(out, rstd, inp, weight, N, C, eps, 1, 0, stream);
}
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     void* stream) {
  forward(out, rstd, inp, weight, N, C, eps, 1, 0, stream);
}
void rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp, const float* weight, int64_t N, int C,
                     float eps, int heads, int64_t ld, void* stream) {
  forward(out, rstd, inp, weight, N, C, eps, heads, ld, stream);
}
size_t rmsnorm_backward_scratch_floats(int64_t groups, int C) {
  return size_t(std::max(backward_blocks(groups), 1)) * size_t(std::max(C, 0));
}
void rmsnorm_backward(float* dinp, float* dweight, const uint16_t* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, float* scratch, void* stream) {
  backward(dinp, dweight, dout, inp, weight, rstd, N, C, accumulate, 1, 0, scratch, stream);
}
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, float* scratch, void* stream) {
  backward(dinp, dweight, dout, inp, weight, rstd, N, C, accumulate, 1, 0, scratch, stream);
}
void rmsnorm_backward(uint16_t* dinp, float* dweight, const uint16_t* dout, const uint16_t* inp,
                      const float* weight, const float* rstd, int64_t N, int C, bool accumulate, int heads,
                      int64_t ld, float* scratch, void* stream) {
  backward(dinp, dweight, dout, inp, weight, rstd, N, C, accumulate, heads, ld, scratch, stream);
}

}  // namespace kiln::cuda
