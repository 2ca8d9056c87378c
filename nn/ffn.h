// The dense feed-forward network of the families here:
//   y = residual + act(x·Wup + b)·Wdown + b                 (GPT-2: GELU)
//   y = residual + (act(x·Wgate) ∘ (x·Wup))·Wdown           (gated: SwiGLU / GeGLU; gate and up one [gate | up] product)
// Forward and backward sit side by side in ffn.cpp.
#pragma once
#include <cstdint>

#include "kernels/activation.h"
#include "nn/backend.h"
#include "nn/workspace.h"

namespace kiln::nn {

struct FFNShape {
  int C = 0;  // model width
  int F = 0;  // hidden width (the gated form has two matrices of it)
  bool gated = false;
  Activation act = Activation::GeluTanh;
  int up() const { return gated ? 2 * F : F; }
};

// What the backward reads. With selective recomputation act is null: the forward writes it to scratch and the
// backward recomputes it there.
struct FFNActivations {
  Act up;   // [N, F] or [N, 2F] ([gate | up]) before the activation
  Act act;  // [N, F] after it
  void allocate(Workspace& ws, int64_t N, const FFNShape& s, bool selective = false);
};

struct FFNScratch {
  Act d_up;     // [N, up]
  Act d_act;    // [N, F] (gated only; else d_up serves both)
  Act act_tmp;  // [N, F] selective recomputation only
  void allocate(Workspace& ws, int64_t N, const FFNShape& s, bool selective = false);
};

struct FeedForward {
  FFNShape shape;
  Weight up, down;

  // y = residual + FFN(x) for N rows of the normed input x. y may alias residual. y == nullptr records the
  // activations only (recomputation skips the last product, which the backward never reads).
  void forward(Backend& be, float* y, const float* residual, Act x, FFNActivations& a, FFNScratch& s,
               int64_t N) const;
  // dx = dL/dx (overwritten) from dy = dL/dy as a product operand; parameter gradients accumulate.
  void backward(Backend& be, Act dx, Act dy, Act x, const FFNActivations& a, FFNScratch& s, int64_t N) const;
};

}  // namespace kiln::nn
