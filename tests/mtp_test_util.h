// Shared by the MTP self-drafting tests (test_mtp_decode.cpp: kiln generate's loop; test_serve_mtp.cpp: the
// paged decoder and the serving engine): deepseek_v3-style models with MTP modules, random weights that make the
// output depend on the context, and the training forward's logits of each depth as the reference of the drafts.
#pragma once
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"

namespace kiln::test {

inline ModelConfig deepseek_mtp(int max_pos, int V = 53, int modules = 3) {
  const std::string json = R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
       "num_hidden_layers":2,"intermediate_size":36,"vocab_size":)" + std::to_string(V) +
                           R"(,"max_position_embeddings":)" + std::to_string(max_pos) + R"(,
       "rms_norm_eps":1e-6,"q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":16,
       "v_head_dim":16,"num_nextn_predict_layers":)" + std::to_string(modules) + R"(,"hidden_act":"silu",
       "tie_word_embeddings":false})";
  return parse_model_config(json, "deepseek_mtp/config.json");
}

// Random weights, scaled up so that the output varies with the context, with non-trivial norm gains.
inline std::unique_ptr<Model> mtp_model(const ModelConfig& cfg, uint64_t seed, float scale) {
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) {
      float& w = m->host_params()[s.offset + i];
      w = s.shape.ndim == 1 ? w + 0.3f * r.normal() : w * scale;
    }
  m->params_changed();
  return m;
}

// A model whose modules mostly guess what the model itself will say: every norm's gain 1, each module's eh_proj
// passing the token's normed embedding through (the hidden-state half zero) and its block's output projections
// zero, so a module computes the main model's function of its input token alone; the main blocks' output
// projections scaled by `context` (0: the main model is a function of the current token too, and every greedy
// draft passes; a little more: its context sometimes changes the arg max, and those drafts fail).
inline std::unique_ptr<Model> agreeing_mtp_model(const ModelConfig& cfg, uint64_t seed, float context) {
  auto m = mtp_model(cfg, seed, 4.0f);
  const int64_t C = cfg.d_model;
  for (const ParamSpec& s : m->table().specs) {
    float* w = m->host_params() + s.offset;
    const std::string layer = "model.layers.";  // Hugging Face's names: model.layers.L.…
    const bool module = s.name.rfind(layer, 0) == 0 && std::stoi(s.name.substr(layer.size())) >= cfg.n_layer;
    if (s.shape.ndim == 1) {
      std::fill_n(w, s.numel(), 1.0f);
    } else if (s.name.find(".eh_proj.") != std::string::npos) {  // [C, 2C]: [embedding | hidden] columns
      std::fill_n(w, s.numel(), 0.0f);
      for (int64_t i = 0; i < C; i++) w[i * 2 * C + i] = 1.0f;
    } else if (s.name.find(".o_proj.") != std::string::npos || s.name.find(".down_proj.") != std::string::npos) {
      for (int64_t i = 0; i < s.numel(); i++) w[i] = module ? 0.0f : w[i] * context;
    }
  }
  m->params_changed();
  return m;
}

// The training forward's logits of depth k (module k at position i guesses token i+k+1) [T, V]: a model with
// k modules holding the same tensors, whose last head is module k's.
inline std::vector<float> depth_logits(const ModelConfig& cfg, Model& full, int k, const std::vector<int32_t>& t,
                                       int T) {
  ModelConfig c = cfg;
  c.mtp_depth = k;
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(c, o);
  for (const ParamSpec& s : m->table().specs) {
    const ParamSpec* f = full.table().find(s.name);
    EXPECT_TRUE(f) << s.name;
    std::copy_n(full.host_params() + f->offset, s.numel(), m->host_params() + s.offset);
  }
  m->params_changed();
  std::vector<int32_t> pos(static_cast<size_t>(T));
  for (int i = 0; i < T; i++) pos[size_t(i)] = i;
  m->plan(1, T);
  m->forward(t.data(), pos.data(), t.data() + 1, m->attention(1, T), 0.0f);
  return std::vector<float>(m->logits(), m->logits() + size_t(T) * size_t(c.vocab_size));
}

}  // namespace kiln::test
