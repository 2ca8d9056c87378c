// GPT-2's hyperparameters in its own terms: what the GPT-2 config loader and the tests use. Every
// family, GPT-2 included, is described by ModelConfig (models/model_config.h); these convert both ways.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention.h"
#include "models/model_config.h"

namespace kiln {

struct GPT2Config {
  int n_layer = 12;
  int n_head = 12;
  int n_embd = 768;
  int vocab_size = 50257;
  int n_positions = 1024;
  float layer_norm_epsilon = 1e-5f;

  int head_dim() const { return n_embd / n_head; }
  // Causal attention over B rows of T tokens (add cu_seqlens for packed sequences).
  AttentionParams attention(int B, int T) const {
    AttentionParams ap;
    ap.B = B;
    ap.T = T;
    ap.NH = n_head;
    ap.HD = head_dim();
    ap.causal = true;
    ap.scale = 1.0f / std::sqrt(float(ap.HD));
    return ap;
  }
  // Throws kiln::Error naming `where` and the field if a value is missing, non-positive or inconsistent.
  void validate(const std::string& where) const;
  // Parameter count (the tied LM head counted once).
  int64_t num_params() const;

  // The same model as a ModelConfig (family gpt2), and back (which fails naming `where` unless cfg is a GPT-2).
  ModelConfig model() const;
  static GPT2Config from(const ModelConfig& cfg, const std::string& where);
  // Accepts a config.json path or a checkpoint directory containing config.json.
  static GPT2Config load(const std::string& path);
  static GPT2Config from_json_text(const std::string& text, const std::string& where);
  // A complete Hugging Face GPT2 config (architectures, model_type, n_ctx, activation_function, ...).
  std::string to_json() const;
};

}  // namespace kiln
