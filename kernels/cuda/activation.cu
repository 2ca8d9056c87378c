// Elementwise ops on the GPU: the activations (kernels/activation.h; GELU forward and backward as before),
// the gated forms, residual add, bf16 <-> fp32 casts.
// One grid-stride kernel, templated on the operation and the operand types: each thread handles 8 elements
// per step with 16-byte accesses when every pointer is 16-byte aligned (the last n % 8 elements are done
// one by one), else 1 element per step. Math in fp32; bf16 results round to nearest even.
// GELU as kernels/cpu/activation.cpp: 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = sqrt(2/π)·(x + 0.044715·x³),
// and with s = sigmoid(2u): d/dx = s + 2·x·s·(1 - s)·u'(x), u' = sqrt(2/π)·(1 + 3·0.044715·x²).
// The gated kernel walks out[N, I] (8 columns of one row per step when I % 8 == 0 and the rows are aligned)
// and reads gate and up from the [gate | up] row; its backward writes both halves of dgate_up.
#include "kernels/activation.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "core/error.h"

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

// The activations and their derivatives, selected at compile time.
template <Activation A>
KILN_DEVICE float act(float x) {
  if constexpr (A == Activation::GeluTanh) return x * sigmoid_2u(x);
  else if constexpr (A == Activation::GeluErf) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  else if constexpr (A == Activation::Relu) return fmaxf(x, 0.0f);
  else if constexpr (A == Activation::Silu) return x / (1.0f + expf(-x));
  else {
    const float r = fmaxf(x, 0.0f);
    return r * r;
  }
}
template <Activation A>
KILN_DEVICE float act_grad(float x) {
  if constexpr (A == Activation::GeluTanh) {
    const float s = sigmoid_2u(x);
    return s + 2.0f * x * s * (1.0f - s) * (kGeluK * (1.0f + 3.0f * kGeluC * x * x));
  } else if constexpr (A == Activation::GeluErf) {  // Φ(x) + x·φ(x)
    return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
  } else if constexpr (A == Activation::Relu) {
    return x > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (A == Activation::Silu) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
  } else {
    return 2.0f * fmaxf(x, 0.0f);
  }
}
template <Activation A>
struct ActForward {
  static constexpr int kArity = 1;
  KILN_DEVICE float operator()(float x, float) const { return act<A>(x); }
};
template <Activation A>
struct ActBackward {  // a = inp, b = dout
  static constexpr int kArity = 2;
  KILN_DEVICE float operator()(float x, float dy) const { return act_grad<A>(x) * dy; }
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

// Gated: element (n, i) of out[N, I]; gate at gate_up[n·2I + i], up at + I. Backward (dout given):
// dgate = act'(gate)·up·dy, dup = act(gate)·dy, written to dgate_up (never aliasing dout).
template <int kN, Activation A, bool kBackward, class TO, class TI>
KILN_GLOBAL void __launch_bounds__(256) gated_kernel(TO* out, const TI* gate_up, const TI* dout, int64_t N, int I) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t units = N * I / kN;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t e = u * kN, n = e / I, i = e % I;  // kN columns of one row (kN divides I)
    const TI* gp = gate_up + n * 2 * I + i;
    float g[kN], up[kN];
    simt::load_vec<kN>(g, gp);
    simt::load_vec<kN>(up, gp + I);
    if constexpr (!kBackward) {
      float r[kN];
      for (int k = 0; k < kN; k++) r[k] = act<A>(g[k]) * up[k];
      simt::store_vec<kN>(out + e, r);
    } else {
      float dy[kN], dg[kN], du[kN];
      simt::load_vec<kN>(dy, dout + e);
      for (int k = 0; k < kN; k++) {
        dg[k] = act_grad<A>(g[k]) * up[k] * dy[k];
        du[k] = act<A>(g[k]) * dy[k];
      }
      TO* dp = out + n * 2 * I + i;
      simt::store_vec<kN>(dp, dg);
      simt::store_vec<kN>(dp + I, du);
    }
  }
}

template <Activation A, bool kBackward, class TO, class TI>
void gated(TO* out, const TI* gate_up, const TI* dout, int64_t N, int I, void* stream) {
  KILN_CHECK(N >= 0 && I >= 0, "gated activation: bad sizes N=", N, " I=", I);
  const int64_t n = N * I;
  if (n <= 0) return;
  constexpr int kThreads = 256;
  auto grid = [&](int64_t units) { return dim3(unsigned(std::min<int64_t>((units + kThreads - 1) / kThreads, 4096))); };
  const auto s = static_cast<cudaStream_t>(stream);
  if (I % 8 == 0 && simt::aligned16(out) && simt::aligned16(gate_up) && simt::aligned16(dout))
    simt::launch(gated_kernel<8, A, kBackward, TO, TI>, grid(n / 8), dim3(kThreads), 0, s, out, gate_up, dout, N, I);
  else
    simt::launch(gated_kernel<1, A, kBackward, TO, TI>, grid(n), dim3(kThreads), 0, s, out, gate_up, dout, N, I);
}

// Calls f(std::integral_constant<Activation, a>{}) so the activation is a template argument below.
template <class F>
void dispatch(Activation a, F&& f) {
  switch (a) {
    case Activation::GeluTanh: return f(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::GeluErf: return f(std::integral_constant<Activation, Activation::GeluErf>{});
    case Activation::Relu: return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Silu: return f(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Relu2: return f(std::integral_constant<Activation, Activation::Relu2>{});
  }
  ::kiln::fail("activation: unknown Activation ", int(a));
}

template <class T>
void act_forward(T* out, const T* inp, int64_t n, Activation a, void* stream) {
  dispatch(a, [&](auto A) { map(out, inp, static_cast<const T*>(nullptr), n, ActForward<decltype(A)::value>{}, stream); });
}
template <class T>
void act_backward(T* dinp, const T* inp, const T* dout, int64_t n, Activation a, void* stream) {
  dispatch(a, [&](auto A) { map(dinp, inp, dout, n, ActBackward<decltype(A)::value>{}, stream); });
}
template <class T>
void gate_forward(T* out, const T* gate_up, int64_t N, int I, Activation a, void* stream) {
  dispatch(a, [&](auto A) { gated<decltype(A)::value, false>(out, gate_up, static_cast<const T*>(nullptr), N, I, stream); });
}
template <class T>
void gate_backward(T* dgate_up, const T* gate_up, const T* dout, int64_t N, int I, Activation a, void* stream) {
  dispatch(a, [&](auto A) { gated<decltype(A)::value, true>(dgate_up, gate_up, dout, N, I, stream); });
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
// One thread per element, grid-stride (a strided copy of a few rows: v heads beside normed q/k, last rows).
template <class T>
KILN_GLOBAL void copy_rows_kernel(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t width, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    dst[r * ld_dst + c] = src[r * ld_src + c];
  }
}
template <class T>
void copy_rows_t(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t N, int64_t width, void* stream) {
  KILN_CHECK(N >= 0 && width >= 0 && ld_dst >= width && ld_src >= width, "copy_rows: ", N, " rows of ", width,
             " with strides ", ld_dst, " and ", ld_src);
  const int64_t n = N * width;
  if (n == 0) return;
  KILN_CHECK(dst && src, "copy_rows: null pointer argument");
  simt::launch(copy_rows_kernel<T>, dim3(unsigned(std::min<int64_t>((n + 255) / 256, 4096))), dim3(256), 0, static_cast<cudaStream_t>(stream), dst, ld_dst, src,
               ld_src, width, n);
}
void copy_rows(uint16_t* dst, int64_t ld_dst, const uint16_t* src, int64_t ld_src, int64_t N, int64_t width,
               void* stream) {
  copy_rows_t(dst, ld_dst, src, ld_src, N, width, stream);
}
void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t N, int64_t width, void* stream) {
  copy_rows_t(dst, ld_dst, src, ld_src, N, width, stream);
}

// One thread per output element: the heads' values summed in fp32.
KILN_GLOBAL void sum_heads_kernel(uint16_t* out, int64_t ld_out, const uint16_t* in, int64_t ld_in, int heads,
                                  int64_t head_stride, int width, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    const uint16_t* row = in + r * ld_in + c;
    float s = 0.0f;
    for (int h = 0; h < heads; h++) s += simt::bf16_to_f32(row[h * head_stride]);
    out[r * ld_out + c] = simt::f32_to_bf16(s);
  }
}
void sum_heads(uint16_t* out, int64_t ld_out, const uint16_t* in, int64_t ld_in, int64_t N, int heads,
               int64_t head_stride, int width, void* stream) {
  KILN_CHECK(N >= 0 && heads >= 1 && width >= 0 && ld_out >= width && head_stride >= 0, "sum_heads: ", N,
             " rows of ", heads, " heads of ", width, " (strides ", ld_out, ", ", ld_in, ", ", head_stride, ")");
  const int64_t n = N * width;
  if (n == 0) return;
  KILN_CHECK(out && in, "sum_heads: null pointer argument");
  simt::launch(sum_heads_kernel, dim3(unsigned(std::min<int64_t>((n + 255) / 256, 4096))), dim3(256), 0,
               static_cast<cudaStream_t>(stream), out, ld_out, in, ld_in, heads, head_stride, width, n);
}

// One thread per copied element; the destination row comes from the sequence's cached length on the device
// (and with a block table, from the block holding that position).
KILN_GLOBAL void rows_append_kernel(uint16_t* cache, int64_t batch_stride, const uint16_t* src, int64_t ld_src,
                                    int width, int Tq, const int32_t* past, int64_t n, const int32_t* table,
                                    int block_size, int64_t table_stride) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i % width, b = r / Tq, j = past[b] + r % Tq;
    const int64_t at = table ? (int64_t(table[b * table_stride + j / block_size]) * block_size + j % block_size) * width
                             : b * batch_stride + j * width;
    cache[at + c] = src[r * ld_src + c];
  }
}
void rows_append(uint16_t* cache, int64_t batch_stride, const uint16_t* src, int64_t ld_src, int width, int B, int Tq,
                 const int32_t* past, void* stream, const KVPages& pages) {
  KILN_CHECK(B >= 0 && Tq >= 0 && width >= 0 && ld_src >= width, "rows_append: ", B, "x", Tq, " rows of ", width,
             " (source stride ", ld_src, ")");
  const int64_t n = int64_t(B) * Tq * width;
  if (n == 0) return;
  KILN_CHECK(cache && src && past, "rows_append: null pointer argument");
  simt::launch(rows_append_kernel, dim3(unsigned(std::min<int64_t>((n + 255) / 256, 4096))), dim3(256), 0,
               static_cast<cudaStream_t>(stream), cache, batch_stride, src, ld_src, width, Tq, past, n, pages.table,
               pages.block_size, pages.stride);
}

void cast(float* out, const uint16_t* inp, int64_t n, void* stream) {
  map(out, inp, static_cast<const uint16_t*>(nullptr), n, Copy{}, stream);
}

void activation_forward(uint16_t* out, const uint16_t* inp, int64_t n, Activation a, void* stream) {
  act_forward(out, inp, n, a, stream);
}
void activation_forward(float* out, const float* inp, int64_t n, Activation a, void* stream) {
  act_forward(out, inp, n, a, stream);
}
void activation_backward(uint16_t* dinp, const uint16_t* inp, const uint16_t* dout, int64_t n, Activation a,
                         void* stream) {
  act_backward(dinp, inp, dout, n, a, stream);
}
void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a, void* stream) {
  act_backward(dinp, inp, dout, n, a, stream);
}
void gated_forward(uint16_t* out, const uint16_t* gate_up, int64_t N, int I, Activation a, void* stream) {
  gate_forward(out, gate_up, N, I, a, stream);
}
void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a, void* stream) {
  gate_forward(out, gate_up, N, I, a, stream);
}
void gated_backward(uint16_t* dgate_up, const uint16_t* gate_up, const uint16_t* dout, int64_t N, int I,
                    Activation a, void* stream) {
  gate_backward(dgate_up, gate_up, dout, N, I, a, stream);
}
void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a,
                    void* stream) {
  gate_backward(dgate_up, gate_up, dout, N, I, a, stream);
}

}  // namespace kiln::cuda
