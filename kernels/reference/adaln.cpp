// Naive adaLN modulation (kernels/adaln.h), double accumulation.
#include "kernels/adaln.h"

namespace kiln::ref {

void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld) {
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < C; c++) {
        const int64_t i = (int64_t(b) * T + t) * C + c;
        out[i] = float(double(x[i]) * (1.0 + double(scale[b * ld + c])) + double(shift[b * ld + c]));
      }
}

void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld) {
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++) {
      double ds = 0, dc = 0;
      for (int t = 0; t < T; t++) {
        const int64_t i = (int64_t(b) * T + t) * C + c;
        ds += dout[i];
        dc += double(dout[i]) * x[i];
        dx[i] = float(double(dout[i]) * (1.0 + double(scale[b * ld + c])));
      }
      dshift[b * ld + c] = float(ds);
      dscale[b * ld + c] = float(dc);
    }
}

void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld) {
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < C; c++) {
        const int64_t i = (int64_t(b) * T + t) * C + c;
        y[i] = float(double(res[i]) + double(gate[b * ld + c]) * u[i]);
      }
}

void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld) {
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++) {
      double dg = 0;
      for (int t = 0; t < T; t++) {
        const int64_t i = (int64_t(b) * T + t) * C + c;
        dg += double(dy[i]) * u[i];
        du[i] = float(double(gate[b * ld + c]) * dy[i]);
      }
      dgate[b * ld + c] = float(dg);
    }
}

}  // namespace kiln::ref
