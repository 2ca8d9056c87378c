// Naive reference softmax + cross-entropy in double precision; tests only.
#include "kernels/crossentropy.h"

#include <cmath>

namespace kiln::ref {

void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale) {
  for (int64_t n = 0; n < N; n++) {
    float* x = logits + n * ld;
    int t = targets[n];
    if (t < 0) {
      losses[n] = 0.0f;
      if (grad_scale != 0.0f)
        for (int i = 0; i < V; i++) x[i] = 0.0f;
      continue;
    }
    double mx = x[0];
    for (int i = 1; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += std::exp(double(x[i]) - mx);
    losses[n] = float(std::log(sum) + mx - x[t]);
    if (grad_scale != 0.0f) {
      for (int i = 0; i < V; i++) {
        double p = std::exp(double(x[i]) - mx) / sum;
        x[i] = float((p - (i == t ? 1.0 : 0.0)) * grad_scale);
      }
    }
  }
}

}  // namespace kiln::ref
