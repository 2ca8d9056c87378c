// LayerNorm, threaded over rows; the inner loops are plain `omp simd` loops the compiler vectorises.
// The variance is computed in a second pass over the (L1-resident) row, (x - mean)², which stays
// accurate when the row mean is large compared with its spread.
// Backward: dinp += rstd·(g - mean(g) - xhat·mean(g·xhat)) with g = dout·weight; dweight and dbias are
// summed per thread into private buffers and then added in thread order (deterministic for a fixed
// thread count, and no atomics).
#include "kernels/layernorm.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace kiln::cpu {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps) {
#pragma omp parallel for schedule(static) if (N * C > 16384)
  for (int64_t n = 0; n < N; n++) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < C; c++) s += x[c];
    const float m = s / float(C);
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
    const float rs = 1.0f / std::sqrt(v / float(C) + eps);
#pragma omp simd
    for (int c = 0; c < C; c++) y[c] = (x[c] - m) * rs * weight[c] + bias[c];
    if (mean) mean[n] = m;
    if (rstd) rstd[n] = rs;
  }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C) {
  const bool threaded = N * C > 16384;
  const int max_threads = threaded ? omp_get_max_threads() : 1;
  // Per-thread partial sums: [thread][dweight C | dbias C].
  std::vector<float> partial(size_t(max_threads) * 2 * C, 0.0f);
#pragma omp parallel if (threaded)
  {
    float* pw = partial.data() + size_t(omp_get_thread_num()) * 2 * C;
    float* pb = pw + C;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      const float* x = inp + n * C;
      const float* dy = dout + n * C;
      const float m = mean[n], rs = rstd[n];
      float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
      for (int c = 0; c < C; c++) {
        const float g = weight[c] * dy[c];
        sg += g;
        sgx += g * (x[c] - m) * rs;
      }
      const float mg = sg / float(C), mgx = sgx / float(C);
      if (dinp) {
        float* dx = dinp + n * C;
#pragma omp simd
        for (int c = 0; c < C; c++) {
          const float xhat = (x[c] - m) * rs;
          dx[c] += rs * (weight[c] * dy[c] - mg - xhat * mgx);
        }
      }
#pragma omp simd
      for (int c = 0; c < C; c++) {
        pw[c] += dy[c] * (x[c] - m) * rs;
        pb[c] += dy[c];
      }
    }
  }
  for (int t = 0; t < max_threads; t++) {
    const float* pw = partial.data() + size_t(t) * 2 * C;
    const float* pb = pw + C;
    if (dweight)
      for (int c = 0; c < C; c++) dweight[c] += pw[c];
    if (dbias)
      for (int c = 0; c < C; c++) dbias[c] += pb[c];
  }
}

}  // namespace kiln::cpu
