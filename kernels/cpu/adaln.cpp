// adaLN modulation on the CPU (kernels/adaln.h). Threads over samples; within a sample the token loop is outer
// and the channel loop vectorised, the per-(b, c) sums of the backward kept in a row of C accumulators.
#include "kernels/adaln.h"

#include <vector>

namespace kiln::cpu {

void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld) {
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(B) * T * C > 16384)
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++) {
      const float *sh = shift + b * ld, *sc = scale + b * ld;
      const int64_t r = (int64_t(b) * T + t) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) out[r + c] = x[r + c] * (1.0f + sc[c]) + sh[c];
    }
}

void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld) {
#pragma omp parallel for schedule(static) if (int64_t(B) * T * C > 16384)
  for (int b = 0; b < B; b++) {
    float *ds = dshift + b * ld, *dc = dscale + b * ld;
    const float* sc = scale + b * ld;
    for (int c = 0; c < C; c++) ds[c] = dc[c] = 0.0f;
    for (int t = 0; t < T; t++) {
      const int64_t r = (int64_t(b) * T + t) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) {
        const float d = dout[r + c];
        ds[c] += d;
        dc[c] += d * x[r + c];
        dx[r + c] = d * (1.0f + sc[c]);
      }
    }
  }
}

void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld) {
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(B) * T * C > 16384)
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++) {
      const float* g = gate + b * ld;
      const int64_t r = (int64_t(b) * T + t) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) y[r + c] = res[r + c] + g[c] * u[r + c];
    }
}

void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld) {
#pragma omp parallel for schedule(static) if (int64_t(B) * T * C > 16384)
  for (int b = 0; b < B; b++) {
    float* dg = dgate + b * ld;
    const float* g = gate + b * ld;
    for (int c = 0; c < C; c++) dg[c] = 0.0f;
    for (int t = 0; t < T; t++) {
      const int64_t r = (int64_t(b) * T + t) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) {
        dg[c] += dy[r + c] * u[r + c];
        du[r + c] = g[c] * dy[r + c];
      }
    }
  }
}

}  // namespace kiln::cpu
