// Naive reference RMSNorm with double accumulators; tests only.
#include "kernels/rmsnorm.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace kiln::ref {

namespace {
int64_t row_stride(int C, int heads, int64_t ld) { return ld > 0 ? ld : int64_t(heads) * C; }
}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads, int64_t ld) {
  KILN_CHECK(C >= 1 && heads >= 1, "rmsnorm_forward: C (", C, ") and heads (", heads, ") must be positive");
  const int64_t L = row_stride(C, heads, ld);
  for (int64_t n = 0; n < N; n++)
    for (int g = 0; g < heads; g++) {
      const float* x = inp + n * L + int64_t(g) * C;
      double ss = 0;
      for (int c = 0; c < C; c++) ss += double(x[c]) * x[c];
      const double rs = 1.0 / std::sqrt(ss / C + eps);
      float* y = out + n * L + int64_t(g) * C;
      for (int c = 0; c < C; c++) y[c] = float(double(x[c]) * rs * weight[c]);
      if (rstd) rstd[n * heads + g] = float(rs);
    }
}

// With y = x·r·w and r = (mean(x²) + eps)^(−1/2):
//   dx = r·w·dy − x·r³·mean(dy·w·x),  dw += dy·x·r.
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads, int64_t ld) {
  KILN_CHECK(C >= 1 && heads >= 1, "rmsnorm_backward: C (", C, ") and heads (", heads, ") must be positive");
  const int64_t L = row_stride(C, heads, ld);
  std::vector<double> dy(size_t(C), 0.0);
  for (int64_t n = 0; n < N; n++)
    for (int g = 0; g < heads; g++) {
      const int64_t off = n * L + int64_t(g) * C;
      const float* x = inp + off;
      const double r = rstd[n * heads + g];
      double dot = 0;
      for (int c = 0; c < C; c++) {
        dy[size_t(c)] = dout[off + c];  // read whole before dinp (which may alias dout) is written
        dot += dy[size_t(c)] * weight[c] * x[c];
      }
      dot /= C;
      for (int c = 0; c < C; c++) {
        const double dx = r * weight[c] * dy[size_t(c)] - double(x[c]) * r * r * r * dot;
        if (dinp) dinp[off + c] = accumulate ? float(dinp[off + c] + dx) : float(dx);
        if (dweight) dweight[c] += float(dy[size_t(c)] * x[c] * r);
      }
    }
}

}  // namespace kiln::ref
