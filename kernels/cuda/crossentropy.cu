// Fused softmax + cross-entropy on the GPU, one block per row (see kernels/crossentropy.h).
//   1. Each thread runs an online max / sum of exp over its share of the row (16-byte loads: 8 bf16 or
//      2×4 fp32 per step when the rows are 16-byte aligned), rescaling its sum when its max grows.
//   2. The (max, sum) pairs are combined across the block in a fixed order (butterfly in the warp, then the
//      warps in index order), so every thread holds the same row max and sum and the loss is deterministic.
//   3. With a gradient, a second sweep (the row was just read: it comes from L2) overwrites the row with
//      (exp(x - max)/sum - onehot)·grad_scale, and zeroes the padding columns V .. ld-1.
// A target >= V (outside the vocabulary) cannot be reported from the device: its loss is NaN, so it shows.
#include "kernels/crossentropy.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr int kMaxThreads = 512;

// (m, s) ∪ (m2, s2) where s is a sum of exp(x - m). Symmetric bit for bit, so both lanes of a butterfly agree.
KILN_DEVICE void combine(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty (or the row is all -inf)
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

template <int kN>
KILN_DEVICE void accumulate(float& m, float& s, const float (&v)[kN]) {
  float mx = v[0];
  for (int i = 1; i < kN; i++) mx = fmaxf(mx, v[i]);
  if (mx > m) {
    s *= __expf(m - mx);
    m = mx;
  }
  if (m == -INFINITY) return;
  for (int i = 0; i < kN; i++) s += __expf(v[i] - m);
}

template <int kN, class T>
KILN_GLOBAL void __launch_bounds__(kMaxThreads)
    crossentropy_kernel(T* logits, float* losses, const int32_t* targets, int V, int64_t ld, float grad_scale) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * ld;
  const int t = targets[row];
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  const bool grad = grad_scale != 0.0f;
  if (t < 0) {  // ignored row: no loss, no gradient (the whole row, padding included, becomes zero)
    if (tid == 0) losses[row] = 0.0f;
    if (grad)
      for (int64_t i = tid; i < ld; i += nt) x[i] = T(0);
    return;
  }
  // Read before any thread of the block can overwrite the row (the writes follow the reduction below).
  float xt = 0.0f;
  if (tid == 0 && t < V) {
    float v[1];
    simt::load_vec<1>(v, x + t);
    xt = v[0];
  }

  float m = -INFINITY, s = 0.0f;
  const int units = V / kN;
  for (int u = tid; u < units; u += nt) {
    float v[kN];
    simt::load_vec<kN>(v, x + int64_t(u) * kN);
    accumulate<kN>(m, s, v);
  }
  for (int i = units * kN + tid; i < V; i += nt) {
    float v[1];
    simt::load_vec<1>(v, x + i);
    accumulate<1>(m, s, v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    combine(m, s, m2, s2);
  }
  if (nt > 32) {
    float* red = simt::dynamic_smem<float>();
    if (simt::lane_id() == 0) {
      red[2 * simt::warp_id()] = m;
      red[2 * simt::warp_id() + 1] = s;
    }
    __syncthreads();
    m = red[0];
    s = red[1];
    for (int w = 1; w < nt / 32; w++) combine(m, s, red[2 * w], red[2 * w + 1]);
  }
  if (tid == 0) losses[row] = t < V ? logf(s) + m - xt : NAN;
  if (!grad) return;

  const float scale = grad_scale / s;
  const int64_t lunits = ld / kN;  // kN == 8 only when ld % 8 == 0
  for (int64_t u = tid; u < lunits; u += nt) {
    const int64_t c0 = u * kN;
    float g[kN];
    if (c0 < V) {
      simt::load_vec<kN>(g, x + c0);
      for (int i = 0; i < kN; i++) {
        const int64_t c = c0 + i;
        g[i] = c < V ? __expf(g[i] - m) * scale - (c == t ? grad_scale : 0.0f) : 0.0f;
      }
    } else {
      for (int i = 0; i < kN; i++) g[i] = 0.0f;
    }
    simt::store_vec<kN>(x + c0, g);
  }
}

template <class T>
void run(T* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld, float grad_scale,
         void* stream) {
  KILN_CHECK(V > 0 && ld >= V, "softmax_crossentropy: vocabulary size ", V, " with row stride ", ld);
  KILN_CHECK(N < (int64_t(1) << 31), "softmax_crossentropy: ", N, " rows");
  if (N <= 0) return;
  const bool vec = simt::aligned16(logits) && (ld * int64_t(sizeof(T))) % 16 == 0 && ld % 8 == 0;
  const int64_t units = vec ? ld / 8 : ld;
  const int threads = int(std::min<int64_t>((units + 31) / 32 * 32, kMaxThreads));
  const size_t smem = size_t(2 * (threads / 32)) * sizeof(float);
  const auto s = static_cast<cudaStream_t>(stream);
  if (vec)
    simt::launch(crossentropy_kernel<8, T>, dim3(unsigned(N)), dim3(unsigned(threads)), smem, s, logits, losses,
                 targets, V, ld, grad_scale);
  else
    simt::launch(crossentropy_kernel<1, T>, dim3(unsigned(N)), dim3(unsigned(threads)), smem, s, logits, losses,
                 targets, V, ld, grad_scale);
}

}  // namespace

void softmax_crossentropy(uint16_t* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale, void* stream) {
  run(logits, losses, targets, N, V, ld, grad_scale, stream);
}
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale, void* stream) {
  run(logits, losses, targets, N, V, ld, grad_scale, stream);
}

}  // namespace kiln::cuda
