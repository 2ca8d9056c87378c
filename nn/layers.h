// Building-block modules with explicit forward and backward, side by side (llm.c style).
// A module holds pointers to its parameters and to their gradients (same layout, another block);
// activations are passed in by the caller, who owns the memory plan.
//
// Gradient conventions (see kernels/*.h): parameter gradients accumulate (+=) so micro-batches add up;
// Linear's dinp is overwritten; LayerNorm's dinp accumulates, because it is always the residual
// stream's gradient, to which the normalised branch adds its share.
#pragma once
#include <cstdint>

#include "kernels/layernorm.h"
#include "kernels/matmul.h"

namespace kiln::nn {

// y[N, out] = x[N, in] · W[in, out] + b   (Hugging Face Conv1D layout)
struct Linear {
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
  int in = 0, out = 0;

  void forward(float* y, const float* x, int64_t N) const { cpu::matmul_forward(y, x, w, b, N, in, out); }
  // dx (overwritten, may be null) and parameter gradients (accumulated) from dy.
  void backward(float* dx, const float* dy, const float* x, int64_t N) const {
    cpu::matmul_backward(dx, dw, db, dy, x, w, N, in, out);
  }
};

struct LayerNorm {
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
  int dim = 0;
  float eps = 1e-5f;

  void forward(float* y, float* mean, float* rstd, const float* x, int64_t N) const {
    cpu::layernorm_forward(y, mean, rstd, x, w, b, N, dim, eps);
  }
  // dx += dL/dx  (accumulates into the residual gradient)
  void backward(float* dx, const float* dy, const float* x, const float* mean, const float* rstd, int64_t N) const {
    cpu::layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, dim);
  }
};

}  // namespace kiln::nn
