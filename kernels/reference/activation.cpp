// Naive reference GELU (tanh approximation) and add, computed in double; tests only.
#include "kernels/activation.h"

#include <cmath>

namespace kiln::ref {

namespace {
const double kGeluK = std::sqrt(2.0 / M_PI);
}

void gelu_forward(float* out, const float* inp, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    double x = inp[i];
    out[i] = float(0.5 * x * (1.0 + std::tanh(kGeluK * (x + 0.044715 * x * x * x))));
  }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    double x = inp[i];
    double t = std::tanh(kGeluK * (x + 0.044715 * x * x * x));
    double du = kGeluK * (1.0 + 3.0 * 0.044715 * x * x);
    double d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
    dinp[i] = float(d * dout[i]);
  }
}

void add(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

}  // namespace kiln::ref
