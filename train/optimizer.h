// AdamW over a model's flat parameter block with per-tensor weight decay (on tensors with two or more
// dimensions: embeddings and weight matrices; none on biases and norm gains; tensors not `trainable` are left
// alone), plus global-norm gradient
// clipping as torch.nn.utils.clip_grad_norm_ computes it. Applied from outside the model: it works on the
// model's ParamBlocks through the model's backend, so the same code updates a CPU or a GPU model.
#pragma once
#include <cstdint>

#include "core/memory.h"
#include "kernels/adamw.h"
#include "models/model.h"

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
  // be: where the moments live (the model's backend); null means host memory (the CPU kernels).
  AdamW(const ParamTable& table, const AdamWConfig& cfg, nn::Backend* be = nullptr);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // Global norm of grads · unscale (unscale undoes a loss scale); inf or NaN if any gradient is.
  double grad_norm(const ParamBlocks& b, float unscale = 1.0f) const;
  // One update at learning rate lr from grads · unscale, clipped to the configured global norm given that
  // gradient's norm. t is the 1-based step count used for bias correction. With zero_grads the gradients are
  // cleared as they are read, ready for the next step's accumulation. The 16-bit copy, if any, is refreshed.
  void update(const ParamBlocks& b, float lr, int64_t t, double norm, float unscale = 1.0f, bool zero_grads = false);

  // Host blocks (tests and simple callers): the same on host memory.
  double grad_norm(const float* grads, float unscale = 1.0f) const;
  void update(float* params, float* grads, float lr, int64_t t, double norm, float unscale = 1.0f,
              bool zero_grads = false);
  float step(float* params, float* grads, float lr, int64_t t) {
    double norm = grad_norm(grads);
    update(params, grads, lr, t, norm);
    return float(norm);
  }

  // The moments' host copies (checkpoints): call sync_to_host() before reading them after device updates and
  // moments_changed() after writing them.
  float* m() { return m_.f32(); }
  float* v() { return v_.f32(); }
  void sync_to_host();
  void moments_changed();
  size_t num_floats() const { return table_.total; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  const ParamTable& table_;
  AdamWConfig cfg_;
  nn::Backend* be_ = nullptr;  // null: host
  Buffer m_, v_;
  float *dm_ = nullptr, *dv_ = nullptr;  // on the backend's device (== host blocks on the host)
};

}  // namespace kiln
