// Naive reference AdamW step (the formula of kernels/adamw.h, in double) and sum of squares; tests only.
#include "kernels/adamw.h"

#include <cmath>

namespace kiln::ref {

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWHyper& h) {
  double bc1 = 1.0 - std::pow(double(h.beta1), double(h.t));
  double bc2 = 1.0 - std::pow(double(h.beta2), double(h.t));
  for (int64_t i = 0; i < n; i++) {
    double g = double(grad[i]) * h.grad_scale;
    double mi = double(h.beta1) * m[i] + (1.0 - h.beta1) * g;
    double vi = double(h.beta2) * v[i] + (1.0 - h.beta2) * g * g;
    double p = param[i];
    p -= double(h.lr) * (double(h.weight_decay) * p + (mi / bc1) / (std::sqrt(vi / bc2) + h.eps));
    m[i] = float(mi);
    v[i] = float(vi);
    param[i] = float(p);
  }
}

double sum_squares(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += double(x[i]) * x[i];
  return s;
}

}  // namespace kiln::ref
