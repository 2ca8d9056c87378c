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
#include "kernels/matmul_lowp.h"

namespace kiln::nn {

// y[N, out] = x[N, in] · W[in, out] + b   (Hugging Face Conv1D layout)
// Mixed precision: with w_lowp set, products take 16-bit operands (the cached weight copy, activations
// rounded as read) and accumulate in fp32; gradients stay fp32.
struct Linear {
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
  int in = 0, out = 0;
  const uint16_t* w_lowp = nullptr;
  LowpType lowp = LowpType::BF16;
  void* scratch = nullptr;  // kLowpScratchBytes, for the 16-bit products

  void forward(float* y, const float* x, int64_t N) const {
    if (w_lowp)
      cpu::matmul_forward_lowp(y, x, w_lowp, b, N, in, out, lowp, scratch);
    else
      cpu::matmul_forward(y, x, w, b, N, in, out);
  }
  // dx (overwritten, may be null) and parameter gradients (accumulated) from dy.
  void backward(float* dx, const float* dy, const float* x, int64_t N) const {
    if (w_lowp)
      cpu::matmul_backward_lowp(dx, dw, db, dy, x, w_lowp, N, in, out, lowp, scratch);
    else
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
