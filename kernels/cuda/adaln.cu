// adaLN modulation on the GPU (kernels/adaln.h). The forwards are grid-stride element maps; the backwards run
// one thread per (b, c) walking the sample's T tokens in order (adjacent threads read adjacent channels, so the
// accesses coalesce), which makes the sums over T deterministic without atomics. Math in fp32.
#include "kernels/adaln.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

using simt::ld1;
using simt::st1;

template <class T>
KILN_GLOBAL void __launch_bounds__(256) modulate_forward_kernel(T* out, const T* x, const T* shift, const T* scale,
                                                                int B, int Tn, int C, int64_t ld) {
  const int64_t n = int64_t(B) * Tn * C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (int64_t(Tn) * C), c = e % C;
    st1(out + e, ld1(x + e) * (1.0f + ld1(scale + b * ld + c)) + ld1(shift + b * ld + c));
  }
}

template <class T>
KILN_GLOBAL void __launch_bounds__(256) modulate_backward_kernel(T* dx, T* dshift, T* dscale, const T* dout,
                                                                 const T* x, const T* scale, int B, int Tn, int C,
                                                                 int64_t ld) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= int64_t(B) * C) return;
  const int64_t b = k / C, c = k % C;
  const float s1 = 1.0f + ld1(scale + b * ld + c);
  float ds = 0.0f, dc = 0.0f;
  for (int t = 0; t < Tn; t++) {
    const int64_t i = (b * Tn + t) * C + c;
    const float d = ld1(dout + i);
    ds += d;
    dc += d * ld1(x + i);
    st1(dx + i, d * s1);
  }
  st1(dshift + b * ld + c, ds);
  st1(dscale + b * ld + c, dc);
}

template <class G>
KILN_GLOBAL void __launch_bounds__(256) gate_forward_kernel(float* y, const float* res, const float* u, const G* gate,
                                                            int B, int Tn, int C, int64_t ld) {
  const int64_t n = int64_t(B) * Tn * C;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (int64_t(Tn) * C), c = e % C;
    y[e] = res[e] + ld1(gate + b * ld + c) * u[e];
  }
}

template <class G>
KILN_GLOBAL void __launch_bounds__(256) gate_backward_kernel(G* du, G* dgate, const float* dy, const float* u,
                                                             const G* gate, int B, int Tn, int C, int64_t ld) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= int64_t(B) * C) return;
  const int64_t b = k / C, c = k % C;
  const float g = ld1(gate + b * ld + c);
  float dg = 0.0f;
  for (int t = 0; t < Tn; t++) {
    const int64_t i = (b * Tn + t) * C + c;
    dg += dy[i] * u[i];
    st1(du + i, g * dy[i]);
  }
  st1(dgate + b * ld + c, dg);
}

constexpr int kThreads = 256;
dim3 map_grid(int64_t n) { return dim3(unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096))); }
dim3 rows_grid(int64_t n) { return dim3(unsigned((n + kThreads - 1) / kThreads)); }
void check(int B, int T, int C, int64_t ld, const char* op) {
  KILN_CHECK(B >= 0 && T >= 0 && C >= 0 && ld >= C, op, ": bad sizes B=", B, " T=", T, " C=", C, " ld=", ld);
}

template <class T>
void mod_fwd(T* out, const T* x, const T* shift, const T* scale, int B, int Tn, int C, int64_t ld, void* stream) {
  check(B, Tn, C, ld, "modulate_forward");
  const int64_t n = int64_t(B) * Tn * C;
  if (n == 0) return;
  simt::launch(modulate_forward_kernel<T>, map_grid(n), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), out, x,
               shift, scale, B, Tn, C, ld);
}
template <class T>
void mod_bwd(T* dx, T* dshift, T* dscale, const T* dout, const T* x, const T* scale, int B, int Tn, int C, int64_t ld,
             void* stream) {
  check(B, Tn, C, ld, "modulate_backward");
  if (int64_t(B) * C == 0) return;
  simt::launch(modulate_backward_kernel<T>, rows_grid(int64_t(B) * C), dim3(kThreads), 0,
               static_cast<cudaStream_t>(stream), dx, dshift, dscale, dout, x, scale, B, Tn, C, ld);
}
template <class G>
void gate_fwd(float* y, const float* res, const float* u, const G* gate, int B, int Tn, int C, int64_t ld,
              void* stream) {
  check(B, Tn, C, ld, "gate_forward");
  const int64_t n = int64_t(B) * Tn * C;
  if (n == 0) return;
  simt::launch(gate_forward_kernel<G>, map_grid(n), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), y, res, u,
               gate, B, Tn, C, ld);
}
template <class G>
void gate_bwd(G* du, G* dgate, const float* dy, const float* u, const G* gate, int B, int Tn, int C, int64_t ld,
              void* stream) {
  check(B, Tn, C, ld, "gate_backward");
  if (int64_t(B) * C == 0) return;
  simt::launch(gate_backward_kernel<G>, rows_grid(int64_t(B) * C), dim3(kThreads), 0,
               static_cast<cudaStream_t>(stream), du, dgate, dy, u, gate, B, Tn, C, ld);
}

}  // namespace

void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld, void* stream) {
  mod_fwd(out, x, shift, scale, B, T, C, ld, stream);
}
void modulate_forward(uint16_t* out, const uint16_t* x, const uint16_t* shift, const uint16_t* scale, int B, int T,
                      int C, int64_t ld, void* stream) {
  mod_fwd(out, x, shift, scale, B, T, C, ld, stream);
}
void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld, void* stream) {
  mod_bwd(dx, dshift, dscale, dout, x, scale, B, T, C, ld, stream);
}
void modulate_backward(uint16_t* dx, uint16_t* dshift, uint16_t* dscale, const uint16_t* dout, const uint16_t* x,
                       const uint16_t* scale, int B, int T, int C, int64_t ld, void* stream) {
  mod_bwd(dx, dshift, dscale, dout, x, scale, B, T, C, ld, stream);
}
void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld,
                  void* stream) {
  gate_fwd(y, res, u, gate, B, T, C, ld, stream);
}
void gate_forward(float* y, const float* res, const float* u, const uint16_t* gate, int B, int T, int C, int64_t ld,
                  void* stream) {
  gate_fwd(y, res, u, gate, B, T, C, ld, stream);
}
void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld, void* stream) {
  gate_bwd(du, dgate, dy, u, gate, B, T, C, ld, stream);
}
void gate_backward(uint16_t* du, uint16_t* dgate, const float* dy, const float* u, const uint16_t* gate, int B,
                   int T, int C, int64_t ld, void* stream) {
  gate_bwd(du, dgate, dy, u, gate, B, T, C, ld, stream);
}

}  // namespace kiln::cuda
