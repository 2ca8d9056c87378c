// The GPT-2 unit tests were written against kiln's first, GPT-2-only model classes. These thin adapters keep
// them reading as they did while they run on the one Transformer every family composes (models/transformer.h):
// a GPT2Config becomes its ModelConfig, GPT2 is a Transformer, Decoder a TransformerDecoder.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "models/checkpoint.h"
#include "models/config.h"
#include "models/family.h"
#include "models/transformer.h"

namespace kiln {

class GPT2 {
 public:
  explicit GPT2(const GPT2Config& c, bool with_grads = true) : cfg_(c), with_grads_(with_grads) { build({}); }
  const GPT2Config& config() const { return cfg_; }
  const ParamTable& table() const { return m_->table(); }
  float* params() { return m_->host_params(); }
  float* grads() { return m_->blocks().grads; }
  size_t num_floats() const { return m_->table().total; }
  Transformer& model() { return *m_; }
  // Mixed precision: rebuilds the model with 16-bit products, keeping the weights.
  void set_compute_type(std::optional<LowpType> t) {
    std::vector<float> keep(params(), params() + num_floats());
    build(t);
    std::copy(keep.begin(), keep.end(), params());
    m_->params_changed();
  }
  void refresh_lowp_weights() { m_->params_changed(); }
  void init_random(uint64_t seed) { m_->init_random(seed); }
  size_t plan(int B, int T, RecomputePolicy policy = {}, int chunk = 0) { return m_->plan(B, T, policy, chunk); }
  static size_t plan_bytes(const GPT2Config& c, int64_t N, RecomputePolicy policy, int chunk) {
    return Transformer::plan_bytes(c.model(), N, policy, chunk);
  }
  size_t activation_bytes() const { return m_->activation_bytes(); }
  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& ap,
                 float grad_scale) {
    return m_->forward(tokens, pos, targets, ap, grad_scale);
  }
  void backward(const int32_t*, const int32_t*) { m_->backward(); }
  void zero_grad() { m_->zero_grad(); }
  const float* logits() const { return m_->logits(); }
  AttentionParams attention_params(int B, int T) const { return m_->attention(B, T); }

 private:
  void build(std::optional<LowpType> t) {
    ModelOptions o;
    o.with_grads = with_grads_;
    o.lowp = t;
    m_ = std::make_unique<Transformer>(cfg_.model(), o);
  }
  GPT2Config cfg_;
  bool with_grads_;
  std::unique_ptr<Transformer> m_;
};

class Decoder : public TransformerDecoder {
 public:
  Decoder(const GPT2Config& c, const float* params, int batch = 1, int max_positions = 0)
      : TransformerDecoder(c.model(), params, batch, max_positions) {}
};

inline ParamTable gpt2_table(const GPT2Config& c) { return model_param_table(c.model()); }
inline void save_gpt2_checkpoint(const std::string& dir, const GPT2Config& c, const ParamTable& t, const float* p,
                                 DType d) {
  save_model_checkpoint(dir, c.model(), t, p, d);
}
inline void load_gpt2_weights(const std::string& path, const GPT2Config& c, const ParamTable& t, float* p) {
  load_model_weights(path, c.model(), t, p);
}
inline GPT2Config load_gpt2_config_for(const std::string& path) {
  return GPT2Config::from(load_model_config_for(path), path);
}

}  // namespace kiln
