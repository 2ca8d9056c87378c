// Naive reference LayerNorm (biased variance, as torch.nn.LayerNorm), double accumulators; tests only.
#include "kernels/layernorm.h"

#include <cmath>
#include <vector>

namespace kiln::ref {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps) {
  for (int64_t n = 0; n < N; n++) {
    const float* x = inp + n * C;
    double m = 0;
    for (int c = 0; c < C; c++) m += x[c];
    m /= C;
    double var = 0;
    for (int c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
    var /= C;
    double rs = 1.0 / std::sqrt(var + eps);
    for (int c = 0; c < C; c++) out[n * C + c] = float((x[c] - m) * rs * weight[c] + bias[c]);
    if (mean) mean[n] = float(m);
    if (rstd) rstd[n] = float(rs);
  }
}

// With xhat = (x - mean)·rstd and g = dout·weight:
//   dx = rstd · (g - mean(g) - xhat · mean(g · xhat))
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C) {
  std::vector<double> xhat(C), g(C);
  for (int64_t n = 0; n < N; n++) {
    const float* x = inp + n * C;
    const float* dy = dout + n * C;
    double mg = 0, mgx = 0;
    for (int c = 0; c < C; c++) {
      xhat[c] = (double(x[c]) - mean[n]) * rstd[n];
      g[c] = double(dy[c]) * weight[c];
      mg += g[c];
      mgx += g[c] * xhat[c];
    }
    mg /= C;
    mgx /= C;
    for (int c = 0; c < C; c++) {
      if (dinp) dinp[n * C + c] += float(rstd[n] * (g[c] - mg - xhat[c] * mgx));
      if (dweight) dweight[c] += float(dy[c] * xhat[c]);
      if (dbias) dbias[c] += dy[c];
    }
  }
}

}  // namespace kiln::ref
