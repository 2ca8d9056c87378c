#include "models/model_config.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace kiln {

namespace {
// yarn's mscale (Hugging Face's get_mscale / yarn_get_mscale).
double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }
}  // namespace

// MLA under yarn: DeepSeek multiplies the softmax scale by mscale(factor, mscale_all_dim)² (its attention).
float ModelConfig::attention_scale() const {
  double s = 1.0 / std::sqrt(double(head_dim));
  if (mla.on() && rope_scaling.kind == RopeScaling::Yarn && rope_scaling.mscale_all_dim != 0) {
    const double m = yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    s = s * m * m;
  }
  return float(s);
}

float ModelConfig::rope_attention_factor() const {
  const RopeScaling& r = rope_scaling;
  if (r.kind != RopeScaling::Yarn) return 1.0f;
  if (r.attention_factor != 0) return float(r.attention_factor);
  if (r.mscale != 0 && r.mscale_all_dim != 0)
    return float(yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim));
  return float(yarn_mscale(r.factor, 1.0));
}

int64_t ModelConfig::cache_floats_per_token() const {
  if (mla.on()) return int64_t(n_layer) * (mla.kv_lora_rank + mla.qk_rope_dim);
  return int64_t(n_layer) * 2 * kv_dim();
}

namespace {
// The parameter count in 128-bit arithmetic, so that validate() can bound it before anything multiplies
// the sizes in 64 (or 32) bits.
__int128 param_count(const ModelConfig& c, bool active = false) {
  using W = __int128;
  const W C = c.d_model, L = c.n_layer, HD = c.head_dim, F = c.d_ff;
  const W q = W(c.n_head) * HD, kv = W(c.n_kv_head) * HD, qkv = q + 2 * kv;
  const W norm_size = c.norm_bias && c.norm == NormKind::LayerNorm ? 2 * C : C;
  W layer = 2 * norm_size + C * qkv + q * C;
  if (c.mla.on()) {
    const LatentAttention& m = c.mla;
    const W NH = c.n_head, qk = m.qk_dim(), r = m.kv_lora_rank;
    const W qpath = m.q_lora_rank ? C * m.q_lora_rank + m.q_lora_rank + W(m.q_lora_rank) * NH * qk : C * NH * qk;
    layer = 2 * norm_size + qpath + C * (r + m.qk_rope_dim) + r + r * NH * (m.qk_nope_dim + m.v_head_dim) +
            NH * m.v_head_dim * C;
  }
  if (c.qkv_bias) layer += qkv;
  if (c.attn_out_bias) layer += C;
  if (c.qk_norm) layer += 2 * HD;
  W dense = W(c.gated_ffn ? 3 : 2) * C * F;
  if (c.ffn_bias) dense += W(c.gated_ffn ? 2 : 1) * F + C;
  // A MoE layer: router [E, C] (+ bias [E]), routed experts 3·C·moe_d_ff each, the shared SwiGLU.
  const W E = c.n_experts, MF = c.moe_d_ff;
  W moe = E * C + (c.moe_router_bias ? E : 0) + W(active ? c.moe_top_k : c.n_experts) * 3 * C * MF +
          W(c.n_shared_experts) * 3 * C * MF;
  W n = W(c.vocab_size) * C + L * layer + norm_size;
  if (c.n_experts == 0)
    n += L * dense;
  else
    for (int l = 0; l < c.n_layer; l++) n += c.is_moe_layer(l) ? moe : dense;
  // Multi-token prediction: per module one more layer, enorm, hnorm, the shared head's norm and eh_proj.
  for (int l = c.n_layer; l < c.n_layer + c.mtp_depth; l++)
    n += layer + (c.n_experts > 0 && c.is_moe_layer(l) ? moe : dense) + 3 * C + 2 * C * C;
  if (c.positions == PositionKind::Learned) n += W(c.max_positions) * C;
  if (!c.tie_embeddings) n += W(c.vocab_size) * C;
  return n;
}
void validate_moe(const ModelConfig& c, const std::string& where) {
  const int E = c.n_experts;
  KILN_CHECK(E > 0 && E < (1 << 20), where, ": n_routed_experts (num_experts) must be positive (got ", E, ")");
  KILN_CHECK(c.moe_top_k >= 1 && c.moe_top_k <= E, where, ": num_experts_per_tok (", c.moe_top_k,
             ") must be between 1 and the ", E, " routed experts");
  KILN_CHECK(c.moe_d_ff > 0 && c.moe_d_ff < (1 << 30), where, ": moe_intermediate_size must be positive (got ",
             c.moe_d_ff, ")");
  KILN_CHECK(c.n_shared_experts >= 0 && c.n_shared_experts < (1 << 10), where, ": n_shared_experts out of range (",
             c.n_shared_experts, ")");
  KILN_CHECK(c.moe_groups >= 1 && E % c.moe_groups == 0, where, ": n_group (", c.moe_groups,
             ") does not divide the ", E, " routed experts");
  KILN_CHECK(c.moe_topk_groups >= 1 && c.moe_topk_groups <= c.moe_groups, where, ": topk_group (", c.moe_topk_groups,
             ") must be between 1 and n_group (", c.moe_groups, ")");
  // A group is scored by its two best experts, and the kept groups must hold top-k experts.
  KILN_CHECK(c.moe_groups == 1 || E / c.moe_groups >= 2, where, ": n_group (", c.moe_groups,
             ") leaves fewer than 2 experts per group");
  KILN_CHECK(int64_t(c.moe_topk_groups) * (E / c.moe_groups) >= c.moe_top_k, where, ": topk_group (",
             c.moe_topk_groups, ") groups of ", E / c.moe_groups, " experts hold fewer than num_experts_per_tok (",
             c.moe_top_k, ")");
  KILN_CHECK(c.routed_scaling_factor > 0 && std::isfinite(c.routed_scaling_factor), where,
             ": routed_scaling_factor must be positive (got ", c.routed_scaling_factor, ")");
  // (DeepSeek's MTP layers, after the main ones, count as layers here.)
  KILN_CHECK(c.first_k_dense_replace >= 0 && c.first_k_dense_replace <= c.n_layer + c.mtp_depth, where,
             ": first_k_dense_replace (", c.first_k_dense_replace, ") must be between 0 and num_hidden_layers (",
             c.n_layer + c.mtp_depth, ")");
  KILN_CHECK(c.moe_layer_step >= 1, where, ": decoder_sparse_step must be at least 1 (got ", c.moe_layer_step, ")");
  for (int l : c.mlp_only_layers)
    KILN_CHECK(l >= 0 && l < c.n_layer, where, ": mlp_only_layers names layer ", l, " of ", c.n_layer);
  KILN_CHECK(c.gated_ffn && c.activation == Activation::Silu && !c.ffn_bias && c.layout == WeightLayout::OutIn, where,
             ": the experts are SwiGLU feed-forwards without biases (hidden_act silu)");
}

// 2^40 parameters (4 TB in f32) is beyond any model kiln runs; the bound keeps every size product in int64.
constexpr int64_t kMaxParams = int64_t(1) << 40;
}  // namespace

int64_t ModelConfig::num_params() const { return int64_t(param_count(*this)); }
int64_t ModelConfig::active_params() const { return int64_t(param_count(*this, true)); }

bool ModelConfig::is_moe_layer(int l) const {
  if (n_experts <= 0 || l < first_k_dense_replace) return false;
  if (moe_layer_step < 1 || (l + 1) % moe_layer_step != 0) return false;
  for (int d : mlp_only_layers)
    if (d == l) return false;
  return true;
}

bool ModelConfig::has_moe() const {
  for (int l = 0; l < n_layer; l++)
    if (is_moe_layer(l)) return true;
  return false;
}

bool ModelConfig::has_dense_ffn() const {
  for (int l = 0; l < n_layer; l++)
    if (!is_moe_layer(l)) return true;
  return false;
}

std::vector<float> ModelConfig::rope_inv_freq() const {
  const int dim = mla.on() ? mla.qk_rope_dim : head_dim;
  const int half = dim / 2;
  if (rope_scaling.kind == RopeScaling::Yarn) {
    // Hugging Face's _compute_yarn_parameters: a ramp between extrapolated (1/theta^(2i/d)) and interpolated
    // (÷ factor) frequencies over the dims whose wavelengths fall between beta_fast and beta_slow rotations.
    const RopeScaling& s = rope_scaling;
    const double pi = 3.14159265358979323846;
    auto corr = [&](double rot) {
      return dim * std::log(double(s.original_max_positions) / (rot * 2 * pi)) / (2 * std::log(rope_theta));
    };
    double low = corr(s.beta_fast), high = corr(s.beta_slow);
    if (s.truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0);
    high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    std::vector<float> freq(static_cast<size_t>(half));
    for (int i = 0; i < half; i++) {
      // fp32 as torch computes it: pos_freqs = base ** (arange(0, dim, 2).float() / dim).
      const float pos_freq = float(std::pow(rope_theta, double(float(2 * i) / float(dim))));
      const float extra = 1.0f / pos_freq, inter = 1.0f / (float(s.factor) * pos_freq);
      const float ramp = std::clamp(float((i - low) / (high - low)), 0.0f, 1.0f);
      const float extra_factor = 1.0f - ramp;
      freq[size_t(i)] = inter * (1.0f - extra_factor) + extra * extra_factor;
    }
    return freq;
  }
  std::vector<float> freq(static_cast<size_t>(half));
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < half; i++) {
    // Hugging Face: 1 / theta^(2i / d), computed in fp32 from fp32 exponents.
    double inv = 1.0 / std::pow(rope_theta, double(float(2 * i) / float(dim)));
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
  KILN_CHECK(positions != PositionKind::Rotary || mla.on() || head_dim % 2 == 0, where, ": head_dim (", head_dim,
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
  if (rope_scaling.kind == RopeScaling::Yarn)
    KILN_CHECK(rope_scaling.original_max_positions > 0 && rope_scaling.beta_fast > 0 && rope_scaling.beta_slow > 0,
               where, ": rope_scaling (yarn) needs positive original_max_position_embeddings, beta_fast, beta_slow");
  if (mla.on()) {
    const LatentAttention& m = mla;
    for (auto [field, v] : {std::pair<const char*, int>{"kv_lora_rank", m.kv_lora_rank}, {"qk_nope_head_dim", m.qk_nope_dim},
                            {"qk_rope_head_dim", m.qk_rope_dim}, {"v_head_dim", m.v_head_dim}})
      KILN_CHECK(v > 0 && v < (1 << 20), where, ": ", field, " must be positive (got ", v, ")");
    KILN_CHECK(m.q_lora_rank >= 0 && m.q_lora_rank < (1 << 20), where, ": q_lora_rank must be >= 0 (got ",
               m.q_lora_rank, ")");
    KILN_CHECK(m.qk_rope_dim % 2 == 0, where, ": qk_rope_head_dim (", m.qk_rope_dim, ") must be even");
    KILN_CHECK(head_dim == m.qk_dim() && n_kv_head == n_head, where,
               ": latent attention needs head_dim = qk_nope_head_dim + qk_rope_head_dim and one key head per query head");
    KILN_CHECK(positions == PositionKind::Rotary && !qk_norm && !qkv_bias && !attn_out_bias && sliding_window == 0,
               where, ": latent attention has rotary positions and no biases, q/k norms or window");
  }
  KILN_CHECK(mtp_depth >= 0 && mtp_depth <= 16, where, ": num_nextn_predict_layers must be in [0, 16] (got ",
             mtp_depth, ")");
  if (n_experts != 0) validate_moe(*this, where);
  KILN_CHECK(int64_t(vocab_size) * d_model < (int64_t(1) << 34), where, ": model too large");
  // The derived widths are ints (q_dim() etc.): heads x head_dim must fit, as must the whole parameter count.
  const int64_t q = int64_t(n_head) * head_dim, kv = int64_t(n_kv_head) * head_dim;
  KILN_CHECK(q + 2 * kv < (int64_t(1) << 30), where, ": num_attention_heads (", n_head, ") and num_key_value_heads (",
             n_kv_head, ") x head_dim (", head_dim, ") are too large");
  KILN_CHECK(param_count(*this) < kMaxParams, where, ": model too large (", n_layer, " layers of hidden size ", d_model,
             ", ffn ", d_ff, ": over 2^40 parameters)");
}

}  // namespace kiln
