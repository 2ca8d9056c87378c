#include "models/model_config.h"

#include <cmath>

#include "core/error.h"

namespace kiln {

float ModelConfig::attention_scale() const { return 1.0f / std::sqrt(float(head_dim)); }

int64_t ModelConfig::num_params() const {
  const int64_t C = d_model, L = n_layer;
  const int64_t norm_size = norm_bias && norm == NormKind::LayerNorm ? 2 * C : C;
  int64_t layer = 2 * norm_size + int64_t(C) * qkv_dim() + int64_t(q_dim()) * C;
  if (qkv_bias) layer += qkv_dim();
  if (attn_out_bias) layer += C;
  if (qk_norm) layer += 2 * head_dim;
  layer += int64_t(gated_ffn ? 3 : 2) * C * d_ff;
  if (ffn_bias) layer += (gated_ffn ? 2 : 1) * int64_t(d_ff) + C;
  int64_t n = int64_t(vocab_size) * C + L * layer + norm_size;
  if (positions == PositionKind::Learned) n += int64_t(max_positions) * C;
  if (!tie_embeddings) n += int64_t(vocab_size) * C;
  return n;
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  const int half = head_dim / 2;
  std::vector<float> freq(static_cast<size_t>(half));
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < half; i++) {
    // Hugging Face: 1 / theta^(2i / d), computed in fp32 from fp32 exponents.
    double inv = 1.0 / std::pow(rope_theta, double(float(2 * i) / float(head_dim)));
    if (rope_scaling.kind == RopeScaling::Linear) {
      inv /= rope_scaling.factor;
    } else if (rope_scaling.kind == RopeScaling::Llama3) {
      // Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
      const RopeScaling& s = rope_scaling;
      const double low_wavelen = s.original_max_positions / s.low_freq_factor;
      const double high_wavelen = s.original_max_positions / s.high_freq_factor;
      const double wavelen = 2 * pi / inv;
      if (wavelen > low_wavelen) {
        inv = inv / s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (s.original_max_positions / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        inv = (1 - smooth) * inv / s.factor + smooth * inv;
      }
    }
    freq[size_t(i)] = float(inv);
  }
  return freq;
}

void ModelConfig::validate(const std::string& where) const {
  auto positive = [&](const char* field, int64_t v) {
    KILN_CHECK(v > 0 && v < (int64_t(1) << 30), where, ": ", field, " must be positive (got ", v, ")");
  };
  positive("num_hidden_layers (n_layer)", n_layer);
  positive("hidden_size (n_embd)", d_model);
  positive("num_attention_heads (n_head)", n_head);
  positive("num_key_value_heads", n_kv_head);
  positive("head_dim", head_dim);
  positive("intermediate_size (n_inner)", d_ff);
  positive("vocab_size", vocab_size);
  positive("max_position_embeddings (n_positions)", max_positions);
  KILN_CHECK(n_head % n_kv_head == 0, where, ": num_key_value_heads (", n_kv_head,
             ") does not divide num_attention_heads (", n_head, ")");
  KILN_CHECK(positions != PositionKind::Rotary || head_dim % 2 == 0, where, ": head_dim (", head_dim,
             ") must be even for rotary embeddings");
  KILN_CHECK(norm_eps > 0 && norm_eps < 1, where, ": the norm epsilon must be in (0, 1) (got ", norm_eps, ")");
  KILN_CHECK(rope_theta > 0, where, ": rope_theta must be positive (got ", rope_theta, ")");
  KILN_CHECK(sliding_window >= 0, where, ": sliding_window must be >= 0 (got ", sliding_window, ")");
  KILN_CHECK(!gated_ffn || layout == WeightLayout::OutIn, where, ": a gated feed-forward needs nn.Linear weights");
  if (rope_scaling.kind != RopeScaling::None)
    KILN_CHECK(rope_scaling.factor >= 1.0, where, ": rope_scaling.factor must be >= 1 (got ", rope_scaling.factor, ")");
  if (rope_scaling.kind == RopeScaling::Llama3)
    KILN_CHECK(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor && rope_scaling.low_freq_factor > 0 &&
                   rope_scaling.original_max_positions > 0,
               where, ": rope_scaling (llama3) needs 0 < low_freq_factor < high_freq_factor and "
               "original_max_position_embeddings > 0");
  KILN_CHECK(int64_t(vocab_size) * d_model < (int64_t(1) << 34), where, ": model too large");
}

}  // namespace kiln
