// AdamW over the flat parameter block with per-tensor weight decay (on tensors with two or more
// dimensions: embeddings and weight matrices; none on biases and LayerNorm gains), plus global-norm
// gradient clipping as torch.nn.utils.clip_grad_norm_ computes it.
#pragma once
#include <cstdint>

#include "core/memory.h"
#include "kernels/adamw.h"
#include "models/gpt2_params.h"

namespace kiln {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  float grad_clip = 1.0f;  // <= 0: no clipping
};

// The kernel arguments for one tensor's update: lr, betas, eps, weight decay where the tensor takes it, the
// clipping coefficient (grad_clip / norm when the norm exceeds it) times unscale, and zero_grad.
AdamWHyper adamw_hyper(const AdamWConfig& cfg, const ParamSpec& spec, float lr, int64_t t, double norm,
                       float unscale, bool zero_grad);

class AdamW {
 public:
  AdamW(const ParamTable& table, const AdamWConfig& cfg);
  // Global norm of grads · unscale (unscale undoes a loss scale); inf or NaN if any gradient is.
  double grad_norm(const float* grads, float unscale = 1.0f) const;
  // One update at learning rate lr from grads · unscale, clipped to the configured global norm given
  // that gradient's norm. t is the 1-based step count used for bias correction. With zero_grads the
  // gradients are cleared as they are read, ready for the next step's accumulation.
  void update(float* params, float* grads, float lr, int64_t t, double norm, float unscale = 1.0f,
              bool zero_grads = false);
  // grad_norm then update; returns the norm before clipping.
  float step(float* params, float* grads, float lr, int64_t t) {
    double norm = grad_norm(grads);
    update(params, grads, lr, t, norm);
    return float(norm);
  }
  float* m() { return m_.f32(); }
  float* v() { return v_.f32(); }
  size_t num_floats() const { return table_.total; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  const ParamTable& table_;
  AdamWConfig cfg_;
  Buffer m_, v_;
};

}  // namespace kiln
