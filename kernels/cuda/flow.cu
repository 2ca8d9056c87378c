// The flow's elementwise layers on the GPU (kernels/flow.h), fp32 (the MLP's side in bf16 where asked). Maps are
// grid-stride loops; the reductions are deterministic without atomics: actnorm's per-channel sums in one block
// per channel, the coupling's per-sample log-det in one block per sample (both a fixed-order tree in shared
// memory), dscale in one thread per j that walks the samples in order.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"
#include "kernels/flow.h"

namespace kiln::cuda {
namespace {

constexpr int kThreads = 256;  // a power of two (the tree below halves it)

using simt::ld1;
using simt::st1;

// Sums of kV doubles over the block (kThreads threads) in a fixed tree order; every thread gets the totals.
// smem: kV·kThreads doubles.
template <int kV>
KILN_DEVICE void block_sum_d(double (&v)[kV], double* smem) {
  const int t = int(threadIdx.x);
  for (int k = 0; k < kV; k++) smem[k * kThreads + t] = v[k];
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (t < h)
      for (int k = 0; k < kV; k++) smem[k * kThreads + t] += smem[k * kThreads + t + h];
    __syncthreads();
  }
  for (int k = 0; k < kV; k++) v[k] = smem[k * kThreads];
  __syncthreads();  // the next call may overwrite smem
}

// FlowCoupling::out_width() in device code (the struct's member is host-only).
KILN_DEVICE int out_width(const FlowCoupling& c) { return c.additive ? c.nT : 2 * c.nT; }

#define KILN_GRID_STRIDE(e, count) \
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < (count); e += int64_t(gridDim.x) * blockDim.x)

KILN_GLOBAL void __launch_bounds__(kThreads) actnorm_fwd(float* y, double* logdet, const float* x, const float* logs,
                                                         const float* bias, int B, int C, int64_t HW) {
  if (logdet)
    KILN_GRID_STRIDE(b, B) {
      double ld = 0;
      for (int c = 0; c < C; c++) ld += double(logs[c]) * double(HW);
      logdet[b] += ld;
    }
  KILN_GRID_STRIDE(e, int64_t(B) * C * HW) {
    const int c = int(e / HW % C);
    y[e] = x[e] * expf(logs[c]) + bias[c];
  }
}

KILN_GLOBAL void __launch_bounds__(kThreads) actnorm_inv(float* x, const float* y, const float* logs,
                                                         const float* bias, int B, int C, int64_t HW) {
  KILN_GRID_STRIDE(e, int64_t(B) * C * HW) {
    const int c = int(e / HW % C);
    x[e] = (y[e] - bias[c]) * expf(-logs[c]);
  }
}

// One block per channel: dx over its values, and the channel's two sums.
KILN_GLOBAL void __launch_bounds__(kThreads) actnorm_bwd(float* dx, float* dlogs, float* dbias, const float* dy,
                                                         const float* x, const float* logs, double wsum, int B, int C,
                                                         int64_t HW) {
  const int c = int(blockIdx.x);
  const float e = expf(logs[c]);
  double v[2] = {0, 0};
  for (int64_t k = threadIdx.x; k < int64_t(B) * HW; k += kThreads) {
    const int64_t at = (k / HW * C + c) * HW + k % HW;
    dx[at] = dy[at] * e;
    v[0] += double(dy[at]) * double(x[at]) * double(e), v[1] += double(dy[at]);
  }
  block_sum_d<2>(v, simt::dynamic_smem<double>());
  if (threadIdx.x == 0) dlogs[c] += float(wsum * double(HW) + v[0]), dbias[c] += float(v[1]);
}

KILN_GLOBAL void __launch_bounds__(kThreads) actnorm_init_k(float* logs, float* bias, const float* x, int B, int C,
                                                            int64_t HW) {
  const int c = int(blockIdx.x);
  double v[2] = {0, 0};
  for (int64_t k = threadIdx.x; k < int64_t(B) * HW; k += kThreads) {
    const double u = x[(k / HW * C + c) * HW + k % HW];
    v[0] += u, v[1] += u * u;
  }
  block_sum_d<2>(v, simt::dynamic_smem<double>());
  if (threadIdx.x == 0) {
    const double cnt = double(B) * double(HW), mean = v[0] / cnt;
    const double var = v[1] / cnt - mean * mean, sd = sqrt((var > 0 ? var : 0.0) + 1e-6);
    logs[c] = float(-log(sd)), bias[c] = float(-mean / sd);
  }
}

template <class T>
KILN_GLOBAL void __launch_bounds__(kThreads) gather_k(T* xa, const float* x, FlowCoupling c) {
  KILN_GRID_STRIDE(e, int64_t(c.B) * c.nA) st1(xa + e, x[e / c.nA * c.n + c.A[e % c.nA]]);
}

template <class T>
KILN_GLOBAL void __launch_bounds__(kThreads) gather_bwd(float* dx, const T* dxa, FlowCoupling c) {
  KILN_GRID_STRIDE(e, int64_t(c.B) * c.nA) dx[e / c.nA * c.n + c.A[e % c.nA]] += ld1(dxa + e);
}

// One block per sample: y at A and T, and the sample's log-det.
KILN_GLOBAL void __launch_bounds__(kThreads) coupling_fwd(float* y, double* logdet, const float* x, const float* o,
                                                          const float* scale, FlowCoupling c) {
  const int b = int(blockIdx.x), nT = c.nT;
  const int64_t base = int64_t(b) * c.n;
  const float* ob = o + int64_t(b) * out_width(c);
  for (int i = int(threadIdx.x); i < c.nA; i += kThreads) y[base + c.A[i]] = x[base + c.A[i]];
  double ld[1] = {0};
  for (int j = int(threadIdx.x); j < nT; j += kThreads) {
    const int64_t at = base + c.T[j];
    if (c.additive) {
      y[at] = x[at] + ob[j];
    } else {
      const double s = exp(double(scale[j])) * tanh(double(ob[j]));
      y[at] = float(double(x[at]) * exp(s) + double(ob[nT + j]));
      ld[0] += s;
    }
  }
  block_sum_d<1>(ld, simt::dynamic_smem<double>());
  if (threadIdx.x == 0) logdet[b] += ld[0];
}

template <class T>
KILN_GLOBAL void __launch_bounds__(kThreads) coupling_bwd(float* dx, T* dout, float* dscale, const float* dy,
                                                          const float* x, const float* o, const float* scale,
                                                          const double* w, FlowCoupling c) {
  KILN_GRID_STRIDE(e, int64_t(c.B) * c.nA) {
    const int64_t at = e / c.nA * c.n + c.A[e % c.nA];
    dx[at] = dy[at];
  }
  const int nT = c.nT, ow = out_width(c);
  KILN_GRID_STRIDE(j, nT) {
    double g = 0;
    for (int b = 0; b < c.B; b++) {
      const int64_t at = b * c.n + c.T[j];
      T* db = dout + int64_t(b) * ow;
      if (c.additive) {
        dx[at] = dy[at];
        st1(db + j, dy[at]);
        continue;
      }
      const double es = exp(double(scale[j])), th = tanh(double(o[int64_t(b) * ow + j]));
      const double s = es * th, e = exp(s);
      const double ds = double(dy[at]) * double(x[at]) * e + w[b];
      dx[at] = float(double(dy[at]) * e);
      g += ds * s;
      st1(db + j, float(ds * es * (1 - th * th)));
      st1(db + nT + j, dy[at]);
    }
    if (!c.additive) dscale[j] += float(g);
  }
}

KILN_GLOBAL void __launch_bounds__(kThreads) coupling_inv(float* x, const float* y, const float* o,
                                                          const float* scale, FlowCoupling c) {
  KILN_GRID_STRIDE(e, int64_t(c.B) * c.nA) {
    const int64_t at = e / c.nA * c.n + c.A[e % c.nA];
    x[at] = y[at];
  }
  const int nT = c.nT, ow = out_width(c);
  KILN_GRID_STRIDE(e, int64_t(c.B) * nT) {
    const int64_t b = e / nT;
    const int j = int(e % nT);
    const int64_t at = b * c.n + c.T[j];
    const float* ob = o + b * ow;
    if (c.additive) {
      x[at] = y[at] - ob[j];
    } else {
      const double s = exp(double(scale[j])) * tanh(double(ob[j]));
      x[at] = float(double(y[at] - ob[nT + j]) * exp(-s));
    }
  }
}

#undef KILN_GRID_STRIDE

dim3 grid(int64_t n) { return dim3(unsigned(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)))); }
cudaStream_t st(void* s) { return static_cast<cudaStream_t>(s); }
void check(const FlowCoupling& c) {
  KILN_CHECK(c.B >= 0 && c.n >= 0 && c.nA >= 0 && c.nT >= 0 && c.nA + c.nT <= c.n, "flow coupling: bad sizes");
}
template <class T>
void gather_any(T* xa, const float* x, const FlowCoupling& c, void* s) {
  check(c);
  simt::launch(gather_k<T>, grid(int64_t(c.B) * c.nA), dim3(kThreads), 0, st(s), xa, x, c);
}
template <class T>
void gather_bwd_any(float* dx, const T* dxa, const FlowCoupling& c, void* s) {
  check(c);
  simt::launch(gather_bwd<T>, grid(int64_t(c.B) * c.nA), dim3(kThreads), 0, st(s), dx, dxa, c);
}
template <class T>
void coupling_bwd_any(float* dx, T* dout, float* dscale, const float* dy, const float* x, const float* o,
                      const float* scale, const double* w, const FlowCoupling& c, void* s) {
  check(c);
  simt::launch(coupling_bwd<T>, grid(std::max<int64_t>(int64_t(c.B) * c.nA, c.nT)), dim3(kThreads), 0, st(s), dx,
               dout, dscale, dy, x, o, scale, w, c);
}

}  // namespace

void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW, void* s) {
  simt::launch(actnorm_fwd, grid(int64_t(B) * C * HW), dim3(kThreads), 0, st(s), y, logdet, x, logs, bias, B, C, HW);
}
void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW, void* s) {
  if (C <= 0) return;
  simt::launch(actnorm_bwd, dim3(unsigned(C)), dim3(kThreads), 2 * kThreads * sizeof(double), st(s), dx, dlogs, dbias,
               dy, x, logs, wsum, B, C, HW);
}
void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW,
                     void* s) {
  simt::launch(actnorm_inv, grid(int64_t(B) * C * HW), dim3(kThreads), 0, st(s), x, y, logs, bias, B, C, HW);
}
void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW, void* s) {
  KILN_CHECK(B > 0 && HW > 0, "actnorm init: no values");
  if (C <= 0) return;
  simt::launch(actnorm_init_k, dim3(unsigned(C)), dim3(kThreads), 2 * kThreads * sizeof(double), st(s), logs, bias, x,
               B, C, HW);
}
void flow_gather(float* xa, const float* x, const FlowCoupling& c, void* s) { gather_any(xa, x, c, s); }
void flow_gather(uint16_t* xa, const float* x, const FlowCoupling& c, void* s) { gather_any(xa, x, c, s); }
void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c, void* s) { gather_bwd_any(dx, dxa, c, s); }
void flow_gather_backward(float* dx, const uint16_t* dxa, const FlowCoupling& c, void* s) {
  gather_bwd_any(dx, dxa, c, s);
}
void coupling_forward(float* y, double* logdet, const float* x, const float* o, const float* scale,
                      const FlowCoupling& c, void* s) {
  check(c);
  if (c.B <= 0) return;
  simt::launch(coupling_fwd, dim3(unsigned(c.B)), dim3(kThreads), kThreads * sizeof(double), st(s), y, logdet, x, o,
               scale, c);
}
void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* o,
                       const float* scale, const double* w, const FlowCoupling& c, void* s) {
  coupling_bwd_any(dx, dout, dscale, dy, x, o, scale, w, c, s);
}
void coupling_backward(float* dx, uint16_t* dout, float* dscale, const float* dy, const float* x, const float* o,
                       const float* scale, const double* w, const FlowCoupling& c, void* s) {
  coupling_bwd_any(dx, dout, dscale, dy, x, o, scale, w, c, s);
}
void coupling_inverse(float* x, const float* y, const float* o, const float* scale, const FlowCoupling& c, void* s) {
  check(c);
  simt::launch(coupling_inv, grid(int64_t(c.B) * std::max(c.nA, c.nT)), dim3(kThreads), 0, st(s), x, y, o, scale, c);
}

}  // namespace kiln::cuda
