// Naive reference activations, gated forms and add, computed in double; tests only.
#include "kernels/activation.h"

#include <cmath>

#include "core/error.h"

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

namespace {
double act(double x, Activation a) {
  switch (a) {
    case Activation::GeluTanh: return 0.5 * x * (1.0 + std::tanh(kGeluK * (x + 0.044715 * x * x * x)));
    case Activation::GeluErf: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::Relu: return x > 0 ? x : 0.0;
    case Activation::Silu: return x / (1.0 + std::exp(-x));
    case Activation::Relu2: return x > 0 ? x * x : 0.0;
  }
  fail("activation: unknown Activation ", int(a));
}

// d act / dx
double act_grad(double x, Activation a) {
  switch (a) {
    case Activation::GeluTanh: {
      const double t = std::tanh(kGeluK * (x + 0.044715 * x * x * x));
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * kGeluK * (1.0 + 3.0 * 0.044715 * x * x);
    }
    case Activation::GeluErf:
      return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
    case Activation::Relu: return x > 0 ? 1.0 : 0.0;
    case Activation::Silu: {
      const double sg = 1.0 / (1.0 + std::exp(-x));
      return sg * (1.0 + x * (1.0 - sg));
    }
    case Activation::Relu2: return x > 0 ? 2.0 * x : 0.0;
  }
  fail("activation: unknown Activation ", int(a));
}
}  // namespace

void activation_forward(float* out, const float* inp, int64_t n, Activation a) {
  for (int64_t i = 0; i < n; i++) out[i] = float(act(inp[i], a));
}

void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a) {
  for (int64_t i = 0; i < n; i++) dinp[i] = float(act_grad(inp[i], a) * dout[i]);
}

void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a) {
  KILN_CHECK(I >= 0, "gated_forward: I (", I, ") must be non-negative");
  for (int64_t n = 0; n < N; n++)
    for (int i = 0; i < I; i++) {
      const float* r = gate_up + n * 2 * I;
      out[n * I + i] = float(act(r[i], a) * double(r[I + i]));
    }
}

void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a) {
  KILN_CHECK(I >= 0, "gated_backward: I (", I, ") must be non-negative");
  for (int64_t n = 0; n < N; n++)
    for (int i = 0; i < I; i++) {
      const float* r = gate_up + n * 2 * I;
      const double g = r[i], u = r[I + i], dy = dout[n * I + i];
      dgate_up[n * 2 * I + i] = float(act_grad(g, a) * u * dy);
      dgate_up[n * 2 * I + I + i] = float(act(g, a) * dy);
    }
}

void add(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

}  // namespace kiln::ref
