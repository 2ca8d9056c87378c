// The two norms of the families here, over rows of the fp32 residual stream into an activation:
// LayerNorm (GPT-2) and RMSNorm (Llama, Mistral, Qwen, DeepSeek).
#pragma once
#include <cstdint>

#include "nn/backend.h"

namespace kiln::nn {

enum class NormType : uint8_t { LayerNorm, RMSNorm };

struct Norm {
  NormType type = NormType::LayerNorm;
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
  int dim = 0;
  float eps = 1e-5f;
  // mean is unused (may be null) for RMSNorm.
  void forward(Backend& be, Act out, float* mean, float* rstd, const float* x, int64_t N) const {
    if (type == NormType::LayerNorm)
      be.layernorm_forward(out, mean, rstd, x, w, b, N, dim, eps);
    else
      be.rmsnorm_forward(out, rstd, x, w, N, dim, eps);
  }
  // dx += the gradient through the norm.
  void backward(Backend& be, float* dx, Act dout, const float* x, const float* mean, const float* rstd,
                int64_t N) const {
    if (type == NormType::LayerNorm)
      be.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, dim);
    else
      be.rmsnorm_backward(dx, dw, dout, x, w, rstd, N, dim);
  }
};

}  // namespace kiln::nn
