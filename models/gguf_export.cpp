#include "models/gguf_export.h"

#include <cmath>
#include <map>
#include <set>

#include "core/error.h"

namespace kiln {

namespace {

constexpr const char* kWhere = "export_gguf";

struct Plan {
  std::string arch;
  bool permute_qk = false;      // Hugging Face rotate-half → llama.cpp adjacent pairs (arch "llama")
  bool zero_qkv_bias = false;   // qwen2 requires q/k/v biases: zeros when the model has none
  bool rope_freqs = false;      // Llama 3 rope scaling as a tensor
  bool permute_rope = false;    // deepseek2: rotate-half rotary parts → adjacent pairs (rope_interleave false)
};

// Splits "blk.12.attn_q.weight" into layer 12 and "attn_q.weight"; -1 for the tensors outside the blocks.
int split_key(const std::string& key, std::string& rest) {
  if (key.rfind("blk.", 0) != 0) {
    rest = key;
    return -1;
  }
  const size_t dot = key.find('.', 4);
  KILN_CHECK(dot != std::string::npos && dot > 4, kWhere, ": bad tensor key ", key);
  int layer = 0;
  for (size_t i = 4; i < dot; i++) {
    KILN_CHECK(key[i] >= '0' && key[i] <= '9', kWhere, ": bad tensor key ", key);
    layer = layer * 10 + (key[i] - '0');
  }
  rest = key.substr(dot + 1);
  return layer;
}

Plan check_config(const ModelConfig& c) {
  const std::string& f = c.family;
  Plan p;
  p.arch = gguf_arch(f);
  KILN_CHECK(c.n_layer > 0 && c.d_model > 0 && c.n_head > 0 && c.n_kv_head > 0 && c.head_dim > 0 && c.d_ff > 0 &&
                 c.vocab_size > 0 && c.max_positions > 0,
             kWhere, ": ", f, " configuration has a size that is not positive");
  KILN_CHECK(c.n_head % c.n_kv_head == 0, kWhere, ": n_head ", c.n_head, " is not a multiple of n_kv_head ",
             c.n_kv_head);
  if (p.arch == "deepseek2") {
    // llama.cpp's deepseek2 in the absorbed MLA form: rotary parts on adjacent pairs (DeepSeek's interleaved
    // layout as released; rotate-half checkpoints are permuted), no MTP layers in the file. Its lite variant
    // (queries straight from x, no q_lora_rank) is chosen by the layer count alone (26 or 27 in llama.cpp 3.21.1).
    KILN_CHECK(c.mla.on(), kWhere, ": deepseek2 needs latent attention (kv_lora_rank)");
    const bool lite_layers = c.n_layer == 26 || c.n_layer == 27;
    if (c.mla.q_lora_rank == 0)
      KILN_CHECK(lite_layers, kWhere, ": llama.cpp's deepseek2 reads queries without q_lora_rank only in its lite "
                 "variant, which it recognises by 26 or 27 layers: this model has ", c.n_layer);
    else
      KILN_CHECK(!lite_layers, kWhere, ": llama.cpp treats deepseek2 models of 26 or 27 layers as the lite variant "
                 "(no q_lora_rank): ", c.n_layer, " layers with q_lora_rank ", c.mla.q_lora_rank, " are not exported");
    // Yarn as llama.cpp's deepseek2 computes it: cos/sin unscaled (its attn_factor cancels yarn's mscale), the
    // softmax scale times (1 + yarn_log_multiplier·ln factor)², ggml's ramp with beta_fast 32 / beta_slow 1.
    // Hugging Face leaves cos/sin unscaled only when mscale == mscale_all_dim.
    const RopeScaling& rs = c.rope_scaling;
    KILN_CHECK(rs.kind == RopeScaling::None || rs.kind == RopeScaling::Yarn, kWhere,
               ": deepseek2 takes rope_scaling yarn or none");
    if (rs.kind == RopeScaling::Yarn)
      KILN_CHECK(rs.mscale_all_dim != 0 && rs.mscale == rs.mscale_all_dim && rs.attention_factor == 0 && rs.truncate &&
                     rs.beta_fast == 32 && rs.beta_slow == 1,
                 kWhere, ": deepseek2 takes yarn rope_scaling with mscale == mscale_all_dim (nonzero), beta_fast 32, "
                 "beta_slow 1 and no attention_factor (llama.cpp's fixed yarn)");
    KILN_CHECK(c.gated_ffn && c.activation == Activation::Silu && !c.tie_embeddings, kWhere,
               ": deepseek2 needs a SwiGLU feed-forward and an untied head");
    if (c.has_moe()) {
      // llama.cpp: the first leading_dense_block_count layers dense, every later one a mixture of experts.
      for (int l = 0; l < c.n_layer; l++)
        KILN_CHECK(c.is_moe_layer(l) == (l >= c.first_k_dense_replace), kWhere, ": layer ", l, " is ",
                   c.is_moe_layer(l) ? "a mixture of experts" : "dense",
                   "; llama.cpp's deepseek2 has dense layers only before first_k_dense_replace");
    }
    p.permute_rope = !c.mla.rope_interleave;
    return p;
  }
  KILN_CHECK(!c.qk_norm || f == "qwen3" || f == "qwen3_moe", kWhere, ": qk_norm is not supported for ", f,
             " (llama.cpp's ", p.arch, " has no q/k norms)");
  if (f == "gpt2") {
    KILN_CHECK(c.norm == NormKind::LayerNorm && c.norm_bias, kWhere, ": gpt2 needs LayerNorm with biases");
    KILN_CHECK(c.positions == PositionKind::Learned, kWhere, ": gpt2 needs learned positions");
    KILN_CHECK(!c.gated_ffn && c.activation == Activation::GeluTanh, kWhere,
               ": gpt2 needs an ungated tanh-GELU feed-forward");
    KILN_CHECK(c.qkv_bias && c.attn_out_bias && c.ffn_bias, kWhere,
               ": llama.cpp's gpt2 needs biases on every projection");
    KILN_CHECK(c.n_kv_head == c.n_head && c.head_dim * c.n_head == c.d_model, kWhere,
               ": llama.cpp's gpt2 needs n_kv_head == n_head and head_dim == d_model / n_head");
    KILN_CHECK(c.sliding_window == 0, kWhere, ": gpt2 with a sliding window is not supported");
    return p;
  }
  // The rotary families: RMSNorm, SwiGLU.
  KILN_CHECK(c.norm == NormKind::RMSNorm && !c.norm_bias, kWhere, ": ", f, " needs RMSNorm without a bias");
  KILN_CHECK(c.positions == PositionKind::Rotary && c.head_dim % 2 == 0, kWhere, ": ", f,
             " needs rotary positions on an even head_dim");
  KILN_CHECK(c.gated_ffn && c.activation == Activation::Silu && !c.ffn_bias, kWhere, ": ", f,
             " needs a SwiGLU feed-forward without biases");
  // llama.cpp's llama, qwen2 and qwen3 graphs attend over the whole context: a window is exact only when it
  // covers every position the file declares.
  KILN_CHECK(c.sliding_window == 0 || c.sliding_window >= c.max_positions, kWhere, ": sliding window ",
             c.sliding_window, " < context ", c.max_positions, " is not supported (llama.cpp's ", p.arch,
             " architecture ignores it)");
  if (c.rope_scaling.kind == RopeScaling::Llama3) {
    KILN_CHECK(p.arch == "llama", kWhere, ": llama3 rope scaling is only supported for llama and mistral");
    p.rope_freqs = true;
  }
  if (p.arch == "llama") {
    p.permute_qk = true;
  } else if (f == "qwen2") {
    KILN_CHECK(!c.attn_out_bias, kWhere, ": qwen2 with an attention output bias is not supported");
    p.zero_qkv_bias = !c.qkv_bias;
  } else {  // qwen3, qwen3moe
    KILN_CHECK(c.qk_norm, kWhere, ": ", f, " without qk_norm is not supported (llama.cpp requires attn_q_norm)");
    KILN_CHECK(!c.qkv_bias && !c.attn_out_bias, kWhere, ": ", f, " with attention biases is not supported");
  }
  if (p.arch == "qwen3moe") {
    // llama.cpp's qwen3moe graph: every layer a softmax-routed MoE, top-k weights renormalised, no shared
    // expert, no selection bias, no groups.
    for (int l = 0; l < c.n_layer; l++)
      KILN_CHECK(c.is_moe_layer(l), kWhere, ": layer ", l, " is dense (mlp_only_layers / decoder_sparse_step); "
                 "llama.cpp's qwen3moe needs every layer to be a mixture of experts");
    KILN_CHECK(c.norm_topk_prob, kWhere, ": llama.cpp's qwen3moe renormalises the top-k weights (norm_topk_prob true)");
    KILN_CHECK(c.moe_scoring == RouterScoring::Softmax && c.n_shared_experts == 0 && !c.moe_router_bias &&
                   c.moe_groups == 1 && c.routed_scaling_factor == 1.0,
               kWhere, ": llama.cpp's qwen3moe has a plain softmax router without shared experts");
  } else {
    KILN_CHECK(!c.has_moe(), kWhere, ": ", f, " with mixture-of-experts layers has no GGUF export");
  }
  return p;
}

// The row-major shape llama.cpp expects for a tensor ([out, in] for matrices), or empty for a key the
// architecture does not have.
std::vector<int64_t> expected_shape(const ModelConfig& c, const Plan& p, const std::string& key) {
  std::string k;
  const int layer = split_key(key, k);
  const int64_t C = c.d_model, V = c.vocab_size, F = c.d_ff;
  if (p.arch == "deepseek2" && layer >= 0 && layer < c.n_layer) {
    const LatentAttention& m = c.mla;
    const int64_t NH = c.n_head, r = m.kv_lora_rank;
    if (k == "attn_norm.weight" || k == "ffn_norm.weight") return {C};
    if (c.is_moe_layer(layer)) {  // router, selection bias, stacked experts ([E, F, C] row-major), shared experts
      const int64_t E = c.n_experts, MF = c.moe_d_ff, SF = int64_t(c.n_shared_experts) * MF;
      if (k == "ffn_gate_inp.weight") return {E, C};
      if (k == "exp_probs_b.bias" && c.moe_router_bias) return {E};
      if (k == "ffn_gate_exps.weight" || k == "ffn_up_exps.weight") return {E, MF, C};
      if (k == "ffn_down_exps.weight") return {E, C, MF};
      if (SF && (k == "ffn_gate_shexp.weight" || k == "ffn_up_shexp.weight")) return {SF, C};
      if (SF && k == "ffn_down_shexp.weight") return {C, SF};
    }
    if (k == "attn_q.weight" && m.q_lora_rank == 0) return {NH * m.qk_dim(), C};  // the lite variant
    if (k == "attn_q_a.weight") return {m.q_lora_rank, C};
    if (k == "attn_q_a_norm.weight") return {m.q_lora_rank};
    if (k == "attn_q_b.weight") return {NH * m.qk_dim(), m.q_lora_rank};
    if (k == "attn_kv_a_mqa.weight") return {r + m.qk_rope_dim, C};
    if (k == "attn_kv_a_norm.weight") return {r};
    if (k == "attn_kv_b.weight") return {NH * (m.qk_nope_dim + m.v_head_dim), r};  // written as attn_k_b, attn_v_b
    if (k == "attn_output.weight") return {C, NH * m.v_head_dim};
    if (k == "ffn_gate.weight" || k == "ffn_up.weight") return {F, C};
    if (k == "ffn_down.weight") return {C, F};
    return {};
  }
  const bool gpt2 = p.arch == "gpt2";
  if (layer < 0) {
    if (k == "token_embd.weight" || k == "output.weight") return {V, C};
    if (k == "position_embd.weight" && gpt2) return {c.max_positions, C};
    if (k == "output_norm.weight" || (k == "output_norm.bias" && gpt2)) return {C};
    return {};
  }
  if (layer >= c.n_layer) return {};
  if (k == "attn_norm.weight" || k == "ffn_norm.weight") return {C};
  if (gpt2) {
    if (k == "attn_norm.bias" || k == "ffn_norm.bias") return {C};
    if (k == "attn_qkv.weight") return {c.qkv_dim(), C};
    if (k == "attn_qkv.bias") return {c.qkv_dim()};
    if (k == "attn_output.weight") return {C, C};
    if (k == "attn_output.bias" || k == "ffn_down.bias") return {C};
    if (k == "ffn_up.weight") return {F, C};
    if (k == "ffn_up.bias") return {F};
    if (k == "ffn_down.weight") return {C, F};
    return {};
  }
  if (k == "attn_q.weight") return {c.q_dim(), C};
  if (k == "attn_k.weight" || k == "attn_v.weight") return {c.kv_dim(), C};
  if (c.qkv_bias || p.zero_qkv_bias) {
    if (k == "attn_q.bias") return {c.q_dim()};
    if (k == "attn_k.bias" || k == "attn_v.bias") return {c.kv_dim()};
  }
  if (c.qk_norm && (k == "attn_q_norm.weight" || k == "attn_k_norm.weight")) return {c.head_dim};
  if (c.is_moe_layer(layer)) {  // stacked experts: ggml's {C, F, E} is row-major [E, F, C]
    const int64_t E = c.n_experts, MF = c.moe_d_ff;
    if (k == "ffn_gate_inp.weight") return {E, C};
    if (k == "ffn_gate_exps.weight" || k == "ffn_up_exps.weight") return {E, MF, C};
    if (k == "ffn_down_exps.weight") return {E, C, MF};
  }
  if (k == "attn_output.weight") return {C, c.q_dim()};
  if (k == "attn_output.bias" && c.attn_out_bias) return {C};
  if (k == "ffn_gate.weight" || k == "ffn_up.weight") return {F, C};
  if (k == "ffn_down.weight") return {C, F};
  return {};
}

// The per-layer tensors llama.cpp requires (besides the ones outside the blocks).
std::vector<std::string> required_layer_keys(const ModelConfig& c, const Plan& p, int layer) {
  if (p.arch == "deepseek2") {
    std::vector<std::string> r = {"attn_norm.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight",
                                  "attn_k_b.weight",  "attn_v_b.weight",      "attn_output.weight",
                                  "ffn_norm.weight"};
    if (c.mla.q_lora_rank)
      r.insert(r.end(), {"attn_q_a.weight", "attn_q_a_norm.weight", "attn_q_b.weight"});
    else
      r.push_back("attn_q.weight");
    if (!c.is_moe_layer(layer)) {
      r.insert(r.end(), {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"});
      return r;
    }
    r.insert(r.end(), {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"});
    if (c.moe_router_bias) r.push_back("exp_probs_b.bias");
    if (c.n_shared_experts) r.insert(r.end(), {"ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"});
    return r;
  }
  if (p.arch == "gpt2")
    return {"attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight",
            "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias", "ffn_up.weight", "ffn_up.bias",
            "ffn_down.weight", "ffn_down.bias"};
  std::vector<std::string> r = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                "attn_output.weight", "ffn_norm.weight"};
  if (p.arch == "qwen3moe")
    r.insert(r.end(), {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"});
  else
    r.insert(r.end(), {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"});
  if (c.qkv_bias) r.insert(r.end(), {"attn_q.bias", "attn_k.bias", "attn_v.bias"});
  if (c.qk_norm) r.insert(r.end(), {"attn_q_norm.weight", "attn_k_norm.weight"});
  if (c.attn_out_bias) r.push_back("attn_output.bias");
  return r;
}

// Rows of a [heads * hd, in] matrix (or bias, in = 1) from Hugging Face's rotate-half order to llama.cpp's
// adjacent pairs: within a head, row j·hd/2 + i goes to 2i + j.
void permute_rows(const float* src, float* dst, int64_t heads, int64_t hd, int64_t in) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; h++)
    for (int64_t i = 0; i < half; i++)
      for (int64_t j = 0; j < 2; j++) {
        const float* s = src + (h * hd + j * half + i) * in;
        float* d = dst + (h * hd + 2 * i + j) * in;
        std::copy(s, s + in, d);
      }
}

// kv_b_proj [NH·(nope + vd), r] as llama.cpp's absorbed form reads it: attn_k_b [NH][r][nope] (each head's W_UK
// transposed, folded into the query) and attn_v_b [NH][vd][r] (W_UV).
template <class TypeOf>
void add_deepseek2_kv_b(GgufWriter& w, const ModelConfig& c, const std::string& key, const float* src,
                        const TypeOf& type_of) {
  const LatentAttention& m = c.mla;
  const int64_t NH = c.n_head, r = m.kv_lora_rank, nope = m.qk_nope_dim, vd = m.v_head_dim, row = nope + vd;
  const std::string b = key.substr(0, key.size() - std::string("attn_kv_b.weight").size());
  const std::vector<int64_t> ks = {NH, r, nope}, vs = {NH, vd, r};
  w.add_tensor(b + "attn_k_b.weight", ks, type_of(ks), [=](float* dst) {
    for (int64_t h = 0; h < NH; h++)
      for (int64_t j = 0; j < r; j++)
        for (int64_t d = 0; d < nope; d++) dst[(h * r + j) * nope + d] = src[(h * row + d) * r + j];
  });
  w.add_tensor(b + "attn_v_b.weight", vs, type_of(vs), [=](float* dst) {
    for (int64_t h = 0; h < NH; h++)
      std::copy(src + (h * row + nope) * r, src + (h * row + nope + vd) * r, dst + h * vd * r);
  });
}

bool pre_name_ok(const std::string& s) {
  for (char ch : s)
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.')) return false;
  return true;
}

void add_tokenizer(GgufWriter& w, const ModelConfig& c, const GgufTokenizer& t) {
  KILN_CHECK(int64_t(t.tokens.size()) == c.vocab_size, kWhere, ": tokenizer has ", t.tokens.size(),
             " tokens, the model's vocabulary ", c.vocab_size);
  KILN_CHECK(!t.merges.empty(), kWhere, ": tokenizer has no merges (llama.cpp's BPE tokenizer requires them)");
  KILN_CHECK(t.token_type.empty() || t.token_type.size() == t.tokens.size(), kWhere, ": tokenizer has ",
             t.token_type.size(), " token types for ", t.tokens.size(), " tokens");
  for (int id : {t.bos_id, t.eos_id})
    KILN_CHECK(id >= -1 && id < c.vocab_size, kWhere, ": special token id ", id, " outside the vocabulary");
  KILN_CHECK(pre_name_ok(t.pre), kWhere, ": bad pre-tokenizer name '", t.pre, "'");
  w.set("tokenizer.ggml.model", GgufValue::str("gpt2"));  // byte-level BPE
  if (!t.pre.empty()) w.set("tokenizer.ggml.pre", GgufValue::str(t.pre));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array(t.tokens));
  std::vector<int32_t> types = t.token_type;
  if (types.empty()) types.assign(t.tokens.size(), 1);
  w.set("tokenizer.ggml.token_type", GgufValue::array(GgufValueType::I32, types));
  w.set("tokenizer.ggml.merges", GgufValue::str_array(t.merges));
  if (t.bos_id >= 0) w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(uint32_t(t.bos_id)));
  if (t.eos_id >= 0) w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(uint32_t(t.eos_id)));
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(t.add_bos_token));
  if (!t.chat_template.empty()) w.set("tokenizer.chat_template", GgufValue::str(t.chat_template));
}

}  // namespace

std::string gguf_arch(const std::string& family) {
  if (family == "gpt2") return "gpt2";
  if (family == "llama" || family == "mistral") return "llama";
  if (family == "qwen2") return "qwen2";
  if (family == "qwen3") return "qwen3";
  if (family == "deepseek_v3") return "deepseek2";
  if (family == "qwen3_moe") return "qwen3moe";
  fail(kWhere, ": family '", family, "' has no GGUF export");
}

void check_gguf_export(const ModelConfig& cfg) { check_config(cfg); }

std::vector<float> llama3_rope_factors(const ModelConfig& c) {
  const RopeScaling& s = c.rope_scaling;
  const double low_wavelen = s.original_max_positions / s.low_freq_factor;
  const double high_wavelen = s.original_max_positions / s.high_freq_factor;
  std::vector<float> f(size_t(c.head_dim / 2));
  for (size_t i = 0; i < f.size(); i++) {
    const double inv_freq = std::pow(c.rope_theta, -double(2 * i) / c.head_dim);
    const double wavelen = 2 * M_PI / inv_freq;
    double factor;
    if (wavelen < high_wavelen) {
      factor = 1.0;
    } else if (wavelen > low_wavelen) {
      factor = s.factor;
    } else {  // between the bands: Hugging Face blends the scaled and unscaled frequency
      const double smooth =
          (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      factor = 1.0 / ((1 - smooth) / s.factor + smooth);
    }
    f[i] = float(factor);
  }
  return f;
}

void export_gguf(const std::string& out_path, const ModelConfig& cfg, const ParamTable& table, const float* params,
                 const GgufTokenizer& tok, GgufType type) {
  KILN_CHECK(type == GgufType::F32 || type == GgufType::F16 || type == GgufType::Q8_0, kWhere,
             ": cannot write matrices as ", gguf_type_name(type));
  const Plan plan = check_config(cfg);
  const std::string& a = plan.arch;
  GgufWriter w;
  w.set("general.architecture", GgufValue::str(a));
  w.set("general.name", GgufValue::str("kiln-" + cfg.family));
  w.set("general.file_type", GgufValue::u32(type == GgufType::F32 ? 0 : type == GgufType::F16 ? 1 : 7));
  w.set("general.quantization_version", GgufValue::u32(2));
  w.set(a + ".context_length", GgufValue::u32(uint32_t(cfg.max_positions)));
  w.set(a + ".embedding_length", GgufValue::u32(uint32_t(cfg.d_model)));
  w.set(a + ".block_count", GgufValue::u32(uint32_t(cfg.n_layer)));
  w.set(a + ".feed_forward_length", GgufValue::u32(uint32_t(cfg.d_ff)));
  w.set(a + ".vocab_size", GgufValue::u32(uint32_t(cfg.vocab_size)));
  w.set(a + ".attention.head_count", GgufValue::u32(uint32_t(cfg.n_head)));
  w.set(a + ".attention.head_count_kv", GgufValue::u32(uint32_t(cfg.n_kv_head)));
  if (a == "deepseek2") {
    // The absorbed form: one shared key head of kv_lora_rank + rope dims, values the latent's kv_lora_rank;
    // the *_mla lengths are the real heads.
    const LatentAttention& m = cfg.mla;
    w.set(a + ".attention.head_count_kv", GgufValue::u32(1));
    w.set(a + ".attention.layer_norm_rms_epsilon", GgufValue::f32(cfg.norm_eps));
    w.set(a + ".rope.freq_base", GgufValue::f32(float(cfg.rope_theta)));
    w.set(a + ".rope.dimension_count", GgufValue::u32(uint32_t(m.qk_rope_dim)));
    w.set(a + ".attention.q_lora_rank", GgufValue::u32(uint32_t(m.q_lora_rank)));
    w.set(a + ".attention.kv_lora_rank", GgufValue::u32(uint32_t(m.kv_lora_rank)));
    w.set(a + ".attention.key_length", GgufValue::u32(uint32_t(m.kv_lora_rank + m.qk_rope_dim)));
    w.set(a + ".attention.value_length", GgufValue::u32(uint32_t(m.kv_lora_rank)));
    w.set(a + ".attention.key_length_mla", GgufValue::u32(uint32_t(m.qk_dim())));
    w.set(a + ".attention.value_length_mla", GgufValue::u32(uint32_t(m.v_head_dim)));
    if (cfg.has_moe()) {
      // DeepSeekMoE: sigmoid (2) or softmax (1) affinities, the selection bias as exp_probs_b, top-k groups.
      w.set(a + ".leading_dense_block_count", GgufValue::u32(uint32_t(cfg.first_k_dense_replace)));
      w.set(a + ".expert_count", GgufValue::u32(uint32_t(cfg.n_experts)));
      w.set(a + ".expert_used_count", GgufValue::u32(uint32_t(cfg.moe_top_k)));
      w.set(a + ".expert_shared_count", GgufValue::u32(uint32_t(cfg.n_shared_experts)));
      w.set(a + ".expert_feed_forward_length", GgufValue::u32(uint32_t(cfg.moe_d_ff)));
      w.set(a + ".expert_weights_scale", GgufValue::f32(float(cfg.routed_scaling_factor)));
      w.set(a + ".expert_weights_norm", GgufValue::boolean(cfg.norm_topk_prob));
      w.set(a + ".expert_gating_func", GgufValue::u32(cfg.moe_scoring == RouterScoring::Sigmoid ? 2 : 1));
      w.set(a + ".expert_group_count", GgufValue::u32(uint32_t(cfg.moe_groups)));
      w.set(a + ".expert_group_used_count", GgufValue::u32(uint32_t(cfg.moe_topk_groups)));
    } else {
      w.set(a + ".leading_dense_block_count", GgufValue::u32(uint32_t(cfg.n_layer)));
      w.set(a + ".expert_count", GgufValue::u32(0));
      w.set(a + ".expert_used_count", GgufValue::u32(0));
      w.set(a + ".expert_shared_count", GgufValue::u32(0));
      w.set(a + ".expert_feed_forward_length", GgufValue::u32(uint32_t(cfg.d_ff)));
      w.set(a + ".expert_weights_scale", GgufValue::f32(1.0f));
    }
    const RopeScaling& rs = cfg.rope_scaling;
    if (rs.kind == RopeScaling::Yarn) {  // check_config admits only the yarn llama.cpp computes
      w.set(a + ".rope.scaling.type", GgufValue::str("yarn"));
      w.set(a + ".rope.scaling.factor", GgufValue::f32(float(rs.factor)));
      w.set(a + ".rope.scaling.original_context_length", GgufValue::u32(uint32_t(rs.original_max_positions)));
      w.set(a + ".rope.scaling.yarn_log_multiplier", GgufValue::f32(float(0.1 * rs.mscale_all_dim)));
    }
  } else if (a == "gpt2") {
    w.set(a + ".attention.layer_norm_epsilon", GgufValue::f32(cfg.norm_eps));
  } else {
    w.set(a + ".attention.layer_norm_rms_epsilon", GgufValue::f32(cfg.norm_eps));
    w.set(a + ".rope.freq_base", GgufValue::f32(float(cfg.rope_theta)));
    w.set(a + ".rope.dimension_count", GgufValue::u32(uint32_t(cfg.head_dim)));
    if (cfg.head_dim * cfg.n_head != cfg.d_model) {  // llama.cpp assumes d_model / n_head otherwise
      w.set(a + ".attention.key_length", GgufValue::u32(uint32_t(cfg.head_dim)));
      w.set(a + ".attention.value_length", GgufValue::u32(uint32_t(cfg.head_dim)));
    }
    if (cfg.rope_scaling.kind == RopeScaling::Linear) {
      w.set(a + ".rope.scaling.type", GgufValue::str("linear"));
      w.set(a + ".rope.scaling.factor", GgufValue::f32(float(cfg.rope_scaling.factor)));
    }
  }
  if (a == "qwen3moe") {
    w.set(a + ".expert_count", GgufValue::u32(uint32_t(cfg.n_experts)));
    w.set(a + ".expert_used_count", GgufValue::u32(uint32_t(cfg.moe_top_k)));
    w.set(a + ".expert_feed_forward_length", GgufValue::u32(uint32_t(cfg.moe_d_ff)));
  }
  add_tokenizer(w, cfg, tok);

  // Tensors: every table entry llama.cpp's architecture has, converted, matrices in `type`.
  const auto tensor_type = [&](const std::vector<int64_t>& shape) {
    if (shape.size() < 2 || type == GgufType::F32) return GgufType::F32;  // norms and biases stay F32
    if (type == GgufType::Q8_0 && shape.back() % kGgufQ8Block != 0) return GgufType::F16;
    return type;
  };
  std::set<std::string> written;
  for (const ParamSpec& s : table.specs) {
    if (s.key == "output.weight" && cfg.tie_embeddings) continue;  // llama.cpp reuses token_embd
    {
      std::string rest;
      const int l = split_key(s.key, rest);
      if (a == "deepseek2" && l >= cfg.n_layer) continue;  // the MTP layers: left out, as llama.cpp's converter does
      if (a == "deepseek2" && rest == "attn_kv_b.weight") {
        add_deepseek2_kv_b(w, cfg, s.key, params + s.offset, tensor_type);
        written.insert("blk." + std::to_string(l) + ".attn_k_b.weight");
        written.insert("blk." + std::to_string(l) + ".attn_v_b.weight");
        continue;
      }
    }
    const std::vector<int64_t> want = expected_shape(cfg, plan, s.key);
    KILN_CHECK(!want.empty(), kWhere, ": tensor ", s.key, " (", s.name, ") has no place in llama.cpp's ", a);
    std::string k;
    const int layer = split_key(s.key, k);
    const bool transpose = cfg.layout == WeightLayout::InOut && s.shape.ndim == 2 && layer >= 0;
    std::vector<int64_t> shape(s.shape.dims.begin(), s.shape.dims.begin() + s.shape.ndim);
    if (transpose) std::swap(shape[0], shape[1]);
    KILN_CHECK(shape == want, kWhere, ": tensor ", s.key, " has shape ", shape_str(shape), " where llama.cpp's ",
               a, " expects ", shape_str(want));
    KILN_CHECK(s.offset + size_t(s.numel()) <= table.total, kWhere, ": tensor ", s.key,
               " lies outside the parameter block");
    int64_t permute_heads = 0;
    if (plan.permute_qk && (k == "attn_q.weight" || k == "attn_q.bias")) permute_heads = cfg.n_head;
    if (plan.permute_qk && (k == "attn_k.weight" || k == "attn_k.bias")) permute_heads = cfg.n_kv_head;
    // deepseek2 from rotate-half: each query head's rotary rows, and kv_a_mqa's, to adjacent pairs.
    const bool rope_rows =
        plan.permute_rope && (k == "attn_q_b.weight" || k == "attn_q.weight" || k == "attn_kv_a_mqa.weight");
    const float* src = params + s.offset;
    const int64_t rows = shape[0], cols = s.numel() / std::max<int64_t>(rows, 1);  // 3-D: [E, F·C] as rows
    const int64_t hd = cfg.head_dim;
    w.add_tensor(s.key, shape, tensor_type(shape), [=](float* dst) {
      if (transpose) {  // Conv1D [in, out] → [out, in]
        for (int64_t o = 0; o < rows; o++)
          for (int64_t i = 0; i < cols; i++) dst[o * cols + i] = src[i * rows + o];
      } else if (permute_heads) {
        permute_rows(src, dst, permute_heads, hd, cols);
      } else if (rope_rows) {
        const LatentAttention& m = cfg.mla;
        std::copy(src, src + rows * cols, dst);
        const int64_t rope = m.qk_rope_dim;
        if (k == "attn_kv_a_mqa.weight") {
          permute_rows(src + m.kv_lora_rank * cols, dst + m.kv_lora_rank * cols, 1, rope, cols);
        } else {
          for (int64_t h = 0; h < cfg.n_head; h++) {
            const int64_t at = (h * m.qk_dim() + m.qk_nope_dim) * cols;
            permute_rows(src + at, dst + at, 1, rope, cols);
          }
        }
      } else {
        std::copy(src, src + rows * cols, dst);
      }
    });
    KILN_CHECK(written.insert(s.key).second, kWhere, ": tensor ", s.key, " appears twice in the table");
    if (s.key == "token_embd.weight" && plan.rope_freqs) {
      const std::vector<float> f = llama3_rope_factors(cfg);
      w.add_tensor("rope_freqs.weight", {int64_t(f.size())}, GgufType::F32,
                   [f](float* dst) { std::copy(f.begin(), f.end(), dst); });
    }
  }
  if (plan.zero_qkv_bias)
    for (int l = 0; l < cfg.n_layer; l++)
      for (const char* n : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) {
        const std::string key = "blk." + std::to_string(l) + "." + n;
        if (written.count(key)) continue;
        const int64_t len = n[5] == 'q' ? cfg.q_dim() : cfg.kv_dim();
        w.add_tensor(key, {len}, GgufType::F32, [len](float* dst) { std::fill(dst, dst + len, 0.0f); });
        written.insert(key);
      }

  // Everything llama.cpp requires must be there before anything is written.
  std::vector<std::string> need = {"token_embd.weight", "output_norm.weight"};
  if (a == "gpt2") need.insert(need.end(), {"position_embd.weight", "output_norm.bias"});
  if (!cfg.tie_embeddings) need.push_back("output.weight");
  for (int l = 0; l < cfg.n_layer; l++)
    for (const auto& k : required_layer_keys(cfg, plan, l)) need.push_back("blk." + std::to_string(l) + "." + k);
  for (const auto& k : need)
    KILN_CHECK(written.count(k), kWhere, ": the parameter table has no ", k, " (llama.cpp's ", a, " requires it)");

  w.write(out_path);
}

}  // namespace kiln
