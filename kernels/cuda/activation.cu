// Elementwise ops on the GPU: tanh-approximation GELU (forward, backward), residual add, bf16 <-> fp32 casts.
// One grid-stride kernel, templated on the operation and the operand types: each thread handles 8 elements
// per step with 16-byte accesses when every pointer is 16-byte aligned (the last n % 8 elements are done
// one by one), else 1 element per step. Math in fp32; bf16 results round to nearest even.
// GELU as kernels/cpu/activation.cpp: 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = sqrt(2/π)·(x + 0.044715·x³),
// and with s = sigmoid(2u): d/dx = s + 2·x·s·(1 - s)·u'(x), u' = sqrt(2/π)·(1 + 3·0.044715·x²).
#include "kernels/activation.h"

#include <algorithm>

#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2/π)
constexpr float kGeluC = 0.044715f;

KILN_DEVICE float sigmoid_2u(float x) {
  const float u = kGeluK * x * (1.0f + kGeluC * x * x);
  return 1.0f / (1.0f + expf(-2.0f * u));
}

struct GeluForward {
  static constexpr int kArity = 1;
  KILN_DEVICE float operator()(float x, float) const { return x * sigmoid_2u(x); }
};
struct GeluBackward {  // a = inp, b = dout
  static constexpr int kArity = 2;
  KILN_DEVICE float operator()(float x, float dy) const {
    const float s = sigmoid_2u(x);
    const float du = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
    return (s + 2.0f * x * s * (1.0f - s) * du) * dy;
  }
};
struct Add {
  static constexpr int kArity = 2;
  KILN_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct Copy {  // the casts: the conversion happens in load_vec / store_vec
  static constexpr int kArity = 1;
  KILN_DEVICE float operator()(float a, float) const { return a; }
};

// out[i] = op(a[i], b[i]). No __restrict__: out may alias a or b (same index only).
template <int kN, class Op, class TO, class TA, class TB>
KILN_GLOBAL void __launch_bounds__(256) map_kernel(TO* out, const TA* a, const TB* b, int64_t n, Op op) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = n / kN;
  for (int64_t u = first; u < units; u += stride) {
    float x[kN], y[kN] = {}, r[kN];
    simt::load_vec<kN>(x, a + u * kN);
    if constexpr (Op::kArity == 2) simt::load_vec<kN>(y, b + u * kN);
    for (int i = 0; i < kN; i++) r[i] = op(x[i], y[i]);
    simt::store_vec<kN>(out + u * kN, r);
  }
  if constexpr (kN > 1) {  // the tail, one element each
    for (int64_t i = units * kN + first; i < n; i += stride) {
      float x[1], y[1] = {0.0f}, r[1];
      simt::load_vec<1>(x, a + i);
      if constexpr (Op::kArity == 2) simt::load_vec<1>(y, b + i);
      r[0] = op(x[0], y[0]);
      simt::store_vec<1>(out + i, r);
    }
  }
}

template <class Op, class TO, class TA, class TB>
void map(TO* out, const TA* a, const TB* b, int64_t n, Op op, void* stream) {
  if (n <= 0) return;
  constexpr int kThreads = 256;
  // Enough blocks to fill an H100 several times over; beyond that the grid-stride loop takes over.
  auto grid = [&](int64_t units) { return dim3(unsigned(std::min<int64_t>((units + kThreads - 1) / kThreads, 4096))); };
  const auto s = static_cast<cudaStream_t>(stream);
  if (simt::aligned16(out) && simt::aligned16(a) && simt::aligned16(b))
    simt::launch(map_kernel<8, Op, TO, TA, TB>, grid((n + 7) / 8), dim3(kThreads), 0, s, out, a, b, n, op);
  else
    simt::launch(map_kernel<1, Op, TO, TA, TB>, grid(n), dim3(kThreads), 0, s, out, a, b, n, op);
}

}  // namespace

void gelu_forward(uint16_t* out, const uint16_t* inp, int64_t n, void* stream) {
  map(out, inp, static_cast<const uint16_t*>(nullptr), n, GeluForward{}, stream);
}
void gelu_forward(float* out, const float* inp, int64_t n, void* stream) {
  map(out, inp, static_cast<const float*>(nullptr), n, GeluForward{}, stream);
}
void gelu_backward(uint16_t* dinp, const uint16_t* inp, const uint16_t* dout, int64_t n, void* stream) {
  map(dinp, inp, dout, n, GeluBackward{}, stream);
}
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream) {
  map(dinp, inp, dout, n, GeluBackward{}, stream);
}
void add(float* out, const float* a, const uint16_t* b, int64_t n, void* stream) { map(out, a, b, n, Add{}, stream); }
void add(float* out, const float* a, const float* b, int64_t n, void* stream) { map(out, a, b, n, Add{}, stream); }
void cast(uint16_t* out, const float* inp, int64_t n, void* stream) {
  map(out, inp, static_cast<const float*>(nullptr), n, Copy{}, stream);
}
void cast(float* out, const uint16_t* inp, int64_t n, void* stream) {
  map(out, inp, static_cast<const uint16_t*>(nullptr), n, Copy{}, stream);
}

}  // namespace kiln::cuda
