// The elementwise layers of a normalizing flow (RealNVP / NICE, models/realnvp.h), fp32, over B samples of n
// values each (an image [C, H, W] flattened). Forward, backward and inverse side by side:
//   actnorm    y = x·e^{logs_c} + bias_c per channel c of HW values; log-det HW·Σ_c logs_c (each sample).
//              backward: dx = dy·e^{logs_c}; dlogs_c += Σ dy·x·e^{logs_c} + HW·Σ_b w_b; dbias_c += Σ dy
//              (w_b: the weight of sample b's log-det in the loss). inverse: x = (y − bias_c)·e^{−logs_c}.
//              init: logs, bias that give y zero mean and unit variance per channel over the batch
//              (sd = sqrt(var + 1e-6), Glow's data-dependent init).
//   gather     xa[b, i] = x[b, A_i]: the coupling's conditioning values, the MLP's input. Its backward adds
//              dxa back into dx at A (A's entries are distinct: no two threads write one value).
//   coupling   the MLP's output o [B, ow] (s̃ then t, or t alone when additive) transforms the set T:
//                affine    s_j = e^{scale_j}·tanh(s̃_j),  y_T = x_T·e^{s} + t,  log-det Σ_j s_j
//                additive  y_T = x_T + t,  log-det 0
//              y_A = x_A. backward (dy, the log-det's weights w) writes dx at A (dy) and at T (dy·e^{s}), the
//              MLP output's gradient dout [B, ow] and dscale += Σ_b ds_j·s_j with ds = dy·x·e^{s} + w_b; the
//              MLP's own gradient reaches dx through the gather's backward. inverse: x_T = (y_T − t)·e^{−s}.
// Squeeze is kernels/upsample.h's pixel_unshuffle (r = 2; its inverse and backward pixel_shuffle); factor-out is
// a copy of rows. Backwards overwrite dx and dout; parameter gradients and log-dets [B] (double) accumulate.
// The reductions are deterministic: ref:: and cpu:: sum in a fixed order; cuda:: reduces each channel (actnorm)
// or sample (the log-det) in one block, and dscale in one thread per j walking b in order. No atomics.
#pragma once
#include <cstdint>

namespace kiln {

// A coupling's shape: B samples of n values; A (nA indices into a sample) conditions, T (nT) is transformed.
// The index arrays live where the kernels run (device memory for cuda::).
struct FlowCoupling {
  int B = 0;
  int64_t n = 0;
  const int32_t* A = nullptr;
  const int32_t* T = nullptr;
  int nA = 0, nT = 0;
  bool additive = false;
  int out_width() const { return additive ? nT : 2 * nT; }  // the MLP's output per sample
};

namespace cpu {
void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW);
void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW);
void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW);
void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW);
void flow_gather(float* xa, const float* x, const FlowCoupling& c);
void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c);
void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                      const FlowCoupling& c);
void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* out,
                       const float* scale, const double* w, const FlowCoupling& c);
void coupling_inverse(float* x, const float* y, const float* out, const float* scale, const FlowCoupling& c);
}  // namespace cpu

// The MLP's side (xa, dxa, dout) may be bf16 (uint16_t), the activations a bf16 device backend's products read.
namespace cuda {
void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW, void* stream);
void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW, void* stream);
void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW,
                     void* stream);
void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW, void* stream);
void flow_gather(float* xa, const float* x, const FlowCoupling& c, void* stream);
void flow_gather(uint16_t* xa, const float* x, const FlowCoupling& c, void* stream);
void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c, void* stream);
void flow_gather_backward(float* dx, const uint16_t* dxa, const FlowCoupling& c, void* stream);
void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                      const FlowCoupling& c, void* stream);
void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* out,
                       const float* scale, const double* w, const FlowCoupling& c, void* stream);
void coupling_backward(float* dx, uint16_t* dout, float* dscale, const float* dy, const float* x, const float* out,
                       const float* scale, const double* w, const FlowCoupling& c, void* stream);
void coupling_inverse(float* x, const float* y, const float* out, const float* scale, const FlowCoupling& c,
                      void* stream);
}  // namespace cuda

namespace ref {
void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW);
void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW);
void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW);
void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW);
void flow_gather(float* xa, const float* x, const FlowCoupling& c);
void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c);
void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                      const FlowCoupling& c);
void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* out,
                       const float* scale, const double* w, const FlowCoupling& c);
void coupling_inverse(float* x, const float* y, const float* out, const float* scale, const FlowCoupling& c);
}  // namespace ref

}  // namespace kiln
