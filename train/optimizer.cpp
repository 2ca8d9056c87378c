#include "train/optimizer.h"

#include <cmath>

namespace kiln {

AdamW::AdamW(const ParamTable& table, const AdamWConfig& cfg)
    : table_(table), cfg_(cfg), m_(table.total * sizeof(float)), v_(table.total * sizeof(float)) {}

double AdamW::grad_norm(const float* grads, float unscale) const {
  // Padding floats between tensors are zero in every block, so one pass over the whole block is exact.
  return std::sqrt(cpu::sum_squares(grads, int64_t(table_.total))) * double(unscale);
}

AdamWHyper adamw_hyper(const AdamWConfig& cfg, const ParamSpec& spec, float lr, int64_t t, double norm,
                       float unscale, bool zero_grad) {
  float clip = 1.0f;
  if (cfg.grad_clip > 0) {
    double coef = double(cfg.grad_clip) / (norm + 1e-6);
    if (coef < 1.0) clip = float(coef);
  }
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = cfg.beta1;
  h.beta2 = cfg.beta2;
  h.eps = cfg.eps;
  h.weight_decay = spec.decay ? cfg.weight_decay : 0.0f;
  h.t = t;
  h.grad_scale = clip * unscale;
  h.zero_grad = zero_grad;
  return h;
}

void AdamW::update(float* params, float* grads, float lr, int64_t t, double norm, float unscale, bool zero_grads) {
  for (const ParamSpec& s : table_.specs) {
    const AdamWHyper h = adamw_hyper(cfg_, s, lr, t, norm, unscale, zero_grads);
    cpu::adamw_update(params + s.offset, grads + s.offset, m_.f32() + s.offset, v_.f32() + s.offset, s.numel(), h);
  }
}

}  // namespace kiln
