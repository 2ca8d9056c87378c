#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

namespace kiln {

AdamW::AdamW(const ParamTable& table, const AdamWConfig& cfg, nn::Backend* be, AdamWShard shard)
    : table_(table),
      cfg_(cfg),
      be_(be),
      lo_(std::min(shard.begin, table.total)),
      hi_(std::max(lo_, std::min(shard.end, table.total))),
      m_((hi_ - lo_) * sizeof(float)),
      v_((hi_ - lo_) * sizeof(float)) {
  if (be_ && be_->act_dtype() != DType::F32) {
    const size_t bytes = (hi_ - lo_) * sizeof(float);
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
  be_->download(m_.data(), dm_, shard_floats() * sizeof(float));
  be_->download(v_.data(), dv_, shard_floats() * sizeof(float));
}

void AdamW::moments_changed() {
  if (!be_) return;
  be_->upload(dm_, m_.data(), shard_floats() * sizeof(float));
  be_->upload(dv_, v_.data(), shard_floats() * sizeof(float));
}

double AdamW::grad_norm(const float* grads, float unscale) const {
  // Padding floats between tensors are zero in every block, so one pass over the whole block is exact.
  return std::sqrt(cpu::sum_squares(grads, int64_t(table_.total))) * double(unscale);
}

double AdamW::grad_norm(const ParamBlocks& b, float unscale) const {
  if (!be_ && b.n == table_.total) return grad_norm(b.grads, unscale);
  return std::sqrt(b.backend->sum_squares(b.grads, int64_t(b.n))) * double(unscale);
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
  KILN_CHECK(!sharded(), "AdamW: the host-block update works on the whole block");
  for (const ParamSpec& s : table_.specs) {
    if (!s.trainable) continue;  // (its gradient is zero)
    const AdamWHyper h = adamw_hyper(cfg_, s, lr, t, norm, unscale, zero_grads);
    cpu::adamw_update(params + s.offset, grads + s.offset, m_.f32() + s.offset, v_.f32() + s.offset, s.numel(), h);
  }
}

void AdamW::update(const ParamBlocks& b, float lr, int64_t t, double norm, float unscale, bool zero_grads) {
  // The blocks hold floats [b.offset, b.offset + b.n) of the table's layout (a sharded model: its segment), which
  // must cover the shard.
  KILN_CHECK(b.offset <= lo_ && b.offset + b.n >= hi_ && b.offset + b.n <= table_.total, "AdamW: parameter block of ",
             b.n, " floats at ", b.offset, " does not cover the shard [", lo_, ", ", hi_, ") of ", table_.total);
  for (const ParamSpec& s : table_.specs) {
    if (!s.trainable) continue;  // (its gradient is zero)
    // The part of this tensor inside the shard (the update is elementwise, so a tensor may be cut anywhere).
    const size_t a = std::max(size_t(s.offset), lo_), e = std::min(size_t(s.offset) + size_t(s.numel()), hi_);
    if (a >= e) continue;
    const AdamWHyper h = adamw_hyper(cfg_, s, lr, t, norm, unscale, zero_grads);
    const size_t at = a - b.offset;
    b.backend->adamw_update(b.params + at, b.params16 ? b.params16 + at : nullptr, b.grads + at, dm_ + (a - lo_),
                            dv_ + (a - lo_), int64_t(e - a), h);
  }
}

}  // namespace kiln
