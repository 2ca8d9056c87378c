#include "train/optimizer.h"

#include <cmath>

namespace kiln {

AdamW::AdamW(const ParamTable& table, const AdamWConfig& cfg, nn::Backend* be)
    : table_(table), cfg_(cfg), be_(be), m_(table.total * sizeof(float)), v_(table.total * sizeof(float)) {
  if (be_ && be_->act_dtype() != DType::F32) {
    const size_t bytes = table.total * sizeof(float);
    dm_ = static_cast<float*>(be_->alloc(bytes, "AdamW first moments"));
    dv_ = static_cast<float*>(be_->alloc(bytes, "AdamW second moments"));
    be_->memset(dm_, 0, bytes);
    be_->memset(dv_, 0, bytes);
  } else {
    be_ = nullptr;  // moments and parameters are host memory: the CPU kernels
    dm_ = m_.f32();
    dv_ = v_.f32();
  }
}

AdamW::~AdamW() {
  if (be_) {
    be_->free(dm_);
    be_->free(dv_);
  }
}

void AdamW::sync_to_host() {
  if (!be_) return;
  be_->download(m_.data(), dm_, table_.total * sizeof(float));
  be_->download(v_.data(), dv_, table_.total * sizeof(float));
}

void AdamW::moments_changed() {
  if (!be_) return;
  be_->upload(dm_, m_.data(), table_.total * sizeof(float));
  be_->upload(dv_, v_.data(), table_.total * sizeof(float));
}

double AdamW::grad_norm(const float* grads, float unscale) const {
  // Padding floats between tensors are zero in every block, so one pass over the whole block is exact.
  return std::sqrt(cpu::sum_squares(grads, int64_t(table_.total))) * double(unscale);
}

double AdamW::grad_norm(const ParamBlocks& b, float unscale) const {
  if (!be_) return grad_norm(b.grads, unscale);
  return std::sqrt(b.backend->sum_squares(b.grads, int64_t(table_.total))) * double(unscale);
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
    if (!s.trainable) continue;  // (its gradient is zero)
    const AdamWHyper h = adamw_hyper(cfg_, s, lr, t, norm, unscale, zero_grads);
    cpu::adamw_update(params + s.offset, grads + s.offset, m_.f32() + s.offset, v_.f32() + s.offset, s.numel(), h);
  }
}

void AdamW::update(const ParamBlocks& b, float lr, int64_t t, double norm, float unscale, bool zero_grads) {
  KILN_CHECK(b.n == table_.total, "AdamW: parameter block of ", b.n, " floats, the table has ", table_.total);
  for (const ParamSpec& s : table_.specs) {
    if (!s.trainable) continue;  // (its gradient is zero)
    const AdamWHyper h = adamw_hyper(cfg_, s, lr, t, norm, unscale, zero_grads);
    b.backend->adamw_update(b.params + s.offset, b.params16 ? b.params16 + s.offset : nullptr, b.grads + s.offset,
                            dm_ + s.offset, dv_ + s.offset, s.numel(), h);
  }
}

}  // namespace kiln
