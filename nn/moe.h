// The mixture-of-experts feed-forward (DeepSeekMoE, Qwen3-MoE), beside the dense one (nn/ffn.h) with the same
// forward / backward shape, so a block holds either:
//   y = residual + Shared(x) + Σ_k w_k(x) · Expert_{i_k}(x)        Expert, Shared: SwiGLU without biases
// The router (fp32) gives affinities s = softmax(x·Wrᵀ) (Qwen3-MoE) or sigmoid(x·Wrᵀ) (DeepSeek-V3); the top-K
// experts are chosen by s + b (b: the loss-free balancing bias, selection only), optionally group-limited;
// w = the chosen s normalised and scaled (kernels/moe.h). The N·K choices are sorted into contiguous
// per-expert rows (a counting sort), the experts run as grouped products over those rows, and the combine
// scatters the weighted rows back. The backward is exact, including the gradient through the gate weights
// into the router (the selection itself is piecewise constant). Forward and backward sit side by side in
// moe.cpp.
#pragma once
#include <cstdint>

#include "kernels/moe.h"
#include "nn/backend.h"
#include "nn/ffn.h"
#include "nn/workspace.h"

namespace kiln::nn {

struct MoEShape {
  int C = 0;         // model width
  int F = 0;         // expert width (moe_intermediate_size)
  int shared_F = 0;  // the shared experts as one SwiGLU of this width (0: none)
  MoeRouting routing;
  int E() const { return routing.E; }
  int K() const { return routing.K; }
  explicit operator bool() const { return routing.E > 0; }
  FFNShape shared() const { return FFNShape{C, shared_F, true, Activation::Silu}; }
};

// What the backward reads. With selective recomputation act is null (rebuilt from hs).
struct MoEActivations {
  float* scores = nullptr;     // [N, E] affinities s
  int32_t* idx = nullptr;      // [N, K] chosen experts
  float* w = nullptr;          // [N, K] gate weights
  int32_t* offsets = nullptr;  // [E + 1] per-expert row ranges of the sorted order
  int32_t* row_token = nullptr;  // [N·K]
  int32_t* slot = nullptr;       // [N·K]
  Act hs;                      // [N·K, 2F] [gate | up] of the sorted rows
  Act act;                     // [N·K, F] after SwiGLU
  Act ys;                      // [N·K, C] the experts' outputs
  FFNActivations shared;
  float* aux_f = nullptr;      // [N, E] the balance loss's f per sequence (at most N sequences)
  double aux_loss = 0;         // the last forward's balance loss (0 when off)
  void allocate(Workspace& ws, int64_t N, const MoEShape& s, bool selective = false);
};

// The sequence-wise balance loss of a training forward (set by the model before each forward): weight alpha,
// the loss gradient's scale (the token losses' grad_scale), the sequences as token spans starts[0..S].
struct MoEAux {
  float alpha = 0, scale = 0;
  const int32_t* starts = nullptr;  // host
  int S = 0;
  bool on() const { return alpha > 0 && scale != 0 && S > 0; }
};

struct MoEScratch {
  float* logits = nullptr;   // [N, E] router logits; the backward's dL/du
  float* d_w = nullptr;      // [N, K]
  Act xs;                    // [N·K, C] the gathered inputs; the backward's dL/dxs
  Act d_ys;                  // [N·K, C]
  Act d_act;                 // [N·K, F]
  Act d_hs;                  // [N·K, 2F]
  Act act_tmp;               // [N·K, F] selective only
  Act d_tmp;                 // [N, C] the shared experts' dx
  FFNScratch shared;
  void allocate(Workspace& ws, int64_t N, const MoEShape& s, bool selective = false);
};

struct MoE {
  MoEShape shape;
  Weight router;                       // [E, C] fp32 (no 16-bit copy: routing is decided in fp32)
  const float* bias = nullptr;         // [E] selection bias, or null
  const float *gate = nullptr, *up = nullptr, *down = nullptr;  // stacked [E, F, C], [E, F, C], [E, C, F]
  float *dgate = nullptr, *dup = nullptr, *ddown = nullptr;
  FeedForward shared;                  // when shape.shared_F
  MoEAux aux;

  // y = residual + MoE(x) for N rows of the normed input x; y may alias residual. y == nullptr records the
  // activations only.
  void forward(Backend& be, float* y, const float* residual, Act x, MoEActivations& a, MoEScratch& s,
               int64_t N) const;
  // dx = dL/dx (overwritten) from dy = dL/dy; parameter gradients accumulate (the bias gets none).
  void backward(Backend& be, Act dx, Act dy, Act x, const MoEActivations& a, MoEScratch& s, int64_t N) const;
};

// Loss-free balancing (DeepSeek-V3, section 2.1.2): bias[i] += gamma · sign(mean(load) − load[i]) on the host.
void moe_bias_update(float* bias, const float* load, int E, float gamma);

}  // namespace kiln::nn
