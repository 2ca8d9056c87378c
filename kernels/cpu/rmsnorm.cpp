// RMSNorm, threaded over (row, head) groups; the inner loops are plain `omp simd` loops the compiler
// vectorises. Sums in fp32, as Hugging Face's LlamaRMSNorm.
// Backward: with y = x·r·w, dx = r·w·dy − x·r³·mean(dy·w·x); dweight is summed per thread into private
// buffers and then added in thread order (deterministic for a fixed thread count, no atomics).
#include "kernels/rmsnorm.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "core/error.h"

namespace kiln::cpu {

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads, int64_t ld) {
  KILN_CHECK(C >= 1 && heads >= 1, "rmsnorm_forward: C (", C, ") and heads (", heads, ") must be positive");
  const int64_t L = ld > 0 ? ld : int64_t(heads) * C, groups = N * heads;
#pragma omp parallel for schedule(static) if (groups * C > 16384)
  for (int64_t t = 0; t < groups; t++) {
    const int64_t off = (t / heads) * L + (t % heads) * C;
    const float* x = inp + off;
    float* y = out + off;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    const float rs = 1.0f / std::sqrt(ss / float(C) + eps);
#pragma omp simd
    for (int c = 0; c < C; c++) y[c] = x[c] * rs * weight[c];
    if (rstd) rstd[t] = rs;
  }
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads, int64_t ld) {
  KILN_CHECK(C >= 1 && heads >= 1, "rmsnorm_backward: C (", C, ") and heads (", heads, ") must be positive");
  const int64_t L = ld > 0 ? ld : int64_t(heads) * C, groups = N * heads;
  const bool threaded = groups * C > 16384;
  const int max_threads = threaded ? omp_get_max_threads() : 1;
  std::vector<float> partial(dweight ? size_t(max_threads) * C : 0, 0.0f);  // [thread][C]
#pragma omp parallel if (threaded)
  {
    float* pw = dweight ? partial.data() + size_t(omp_get_thread_num()) * C : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < groups; t++) {
      const int64_t off = (t / heads) * L + (t % heads) * C;
      const float* x = inp + off;
      const float* dy = dout + off;
      const float rs = rstd[t];
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < C; c++) s += dy[c] * weight[c] * x[c];
      const float k = rs * rs * rs * s / float(C);
      // Each element of dy is read before the same element of dx is written: dinp may alias dout.
      if (pw) {
#pragma omp simd
        for (int c = 0; c < C; c++) pw[c] += dy[c] * x[c] * rs;
      }
      if (dinp) {
        float* dx = dinp + off;
        if (accumulate) {
#pragma omp simd
          for (int c = 0; c < C; c++) dx[c] += rs * weight[c] * dy[c] - x[c] * k;
        } else {
#pragma omp simd
          for (int c = 0; c < C; c++) dx[c] = rs * weight[c] * dy[c] - x[c] * k;
        }
      }
    }
  }
  if (dweight)
    for (int t = 0; t < max_threads; t++)
      for (int c = 0; c < C; c++) dweight[c] += partial[size_t(t) * C + c];
}

}  // namespace kiln::cpu
