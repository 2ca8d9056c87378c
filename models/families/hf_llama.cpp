#include "models/families/hf_llama.h"

#include "core/error.h"
#include "core/quote.h"
#include "models/family.h"

namespace kiln::hf {

using json = nlohmann::json;

int get_int(const json& j, const char* field, const std::string& where, int fallback) {
  if (!j.contains(field) || j[field].is_null()) {
    KILN_CHECK(fallback != -1, where, ": missing field ", field);
    return fallback;
  }
  KILN_CHECK(j[field].is_number_integer(), where, ": field ", field, " must be an integer");
  const int64_t v = j[field].get<int64_t>();
  KILN_CHECK(v >= 0 && v < (int64_t(1) << 30), where, ": field ", field, " out of range (", v, ")");
  return int(v);
}

double get_number(const json& j, const char* field, const std::string& where, double fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  KILN_CHECK(j[field].is_number(), where, ": field ", field, " must be a number");
  return j[field].get<double>();
}

bool get_bool(const json& j, const char* field, const std::string& where, bool fallback) {
  if (!j.contains(field) || j[field].is_null()) return fallback;
  KILN_CHECK(j[field].is_boolean(), where, ": field ", field, " must be true or false");
  return j[field].get<bool>();
}

Activation parse_activation(const json& j, const char* field, const std::string& where, Activation fallback) {
  if (!j.contains(field)) return fallback;
  KILN_CHECK(j[field].is_string(), where, ": field ", field, " must be a string");
  const std::string a = j[field];
  if (a == "silu" || a == "swish") return Activation::Silu;
  if (a == "gelu") return Activation::GeluErf;
  if (a == "gelu_new" || a == "gelu_pytorch_tanh") return Activation::GeluTanh;
  if (a == "relu") return Activation::Relu;
  if (a == "relu2") return Activation::Relu2;
  fail(where, ": ", field, " ", quote_name(a), " is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, relu, relu2)");
}

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::Silu: return "silu";
    case Activation::GeluErf: return "gelu";
    case Activation::GeluTanh: return "gelu_pytorch_tanh";
    case Activation::Relu: return "relu";
    case Activation::Relu2: return "relu2";
  }
  return "?";
}

namespace {

// rope_scaling (transformers 4) or rope_parameters (transformers 5, which also carries rope_theta).
void parse_rope(const json& j, const std::string& where, ModelConfig& c) {
  c.rope_theta = get_number(j, "rope_theta", where, 10000.0);
  const json* s = nullptr;
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) s = &j["rope_scaling"];
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) s = &j["rope_parameters"];
  if (!s) return;
  KILN_CHECK(s->is_object(), where, ": rope_scaling must be an object or null");
  c.rope_theta = get_number(*s, "rope_theta", where, c.rope_theta);
  std::string type;
  for (const char* k : {"rope_type", "type"})
    if (s->contains(k)) {
      KILN_CHECK((*s)[k].is_string(), where, ": rope_scaling.", k, " must be a string");
      type = (*s)[k].get<std::string>();
      break;
    }
  const std::string w = where + ": rope_scaling";
  if (type.empty() || type == "default") return;
  if (type == "linear") {
    c.rope_scaling.kind = RopeScaling::Linear;
    c.rope_scaling.factor = get_number(*s, "factor", w, 0.0);
  } else if (type == "llama3") {
    RopeScaling& r = c.rope_scaling;
    r.kind = RopeScaling::Llama3;
    r.factor = get_number(*s, "factor", w, 0.0);
    r.low_freq_factor = get_number(*s, "low_freq_factor", w, 1.0);
    r.high_freq_factor = get_number(*s, "high_freq_factor", w, 4.0);
    r.original_max_positions = get_int(*s, "original_max_position_embeddings", w, 8192);
  } else if (type == "yarn") {
    RopeScaling& r = c.rope_scaling;
    r.kind = RopeScaling::Yarn;
    r.factor = get_number(*s, "factor", w, 0.0);
    r.original_max_positions = get_int(*s, "original_max_position_embeddings", w, c.max_positions);
    r.beta_fast = get_number(*s, "beta_fast", w, 32.0);
    r.beta_slow = get_number(*s, "beta_slow", w, 1.0);
    r.mscale = get_number(*s, "mscale", w, 0.0);
    r.mscale_all_dim = get_number(*s, "mscale_all_dim", w, 0.0);
    r.attention_factor = get_number(*s, "attention_factor", w, 0.0);
    r.truncate = get_bool(*s, "truncate", w, true);
  } else {
    fail(where, ": rope_scaling type ", quote_name(type), " is not supported (linear, llama3, yarn)");
  }
}

int token_id(const json& j, const char* field, const std::string& where) {
  if (!j.contains(field) || j[field].is_null()) return -1;
  const json& v = j[field];
  // Llama 3.1 lists several end-of-turn ids: the first is the end-of-text token.
  if (v.is_array()) return v.empty() ? -1 : token_id(json{{field, v[0]}}, field, where);
  KILN_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (int64_t(1) << 31), where,
             ": field ", field, " must be a token id");
  return int(v.get<int64_t>());
}

}  // namespace

ModelConfig parse_llama_like(const json& j, const std::string& where, const char* family) {
  ModelConfig c;
  c.family = family;
  c.layout = WeightLayout::OutIn;
  c.norm = NormKind::RMSNorm;
  c.norm_bias = false;
  c.positions = PositionKind::Rotary;
  c.gated_ffn = true;
  c.d_model = get_int(j, "hidden_size", where);
  c.d_ff = get_int(j, "intermediate_size", where);
  c.n_layer = get_int(j, "num_hidden_layers", where);
  c.n_head = get_int(j, "num_attention_heads", where);
  KILN_CHECK(c.n_head > 0, where, ": num_attention_heads must be positive");
  c.n_kv_head = get_int(j, "num_key_value_heads", where, c.n_head);
  KILN_CHECK(c.d_model % c.n_head == 0 || (j.contains("head_dim") && !j["head_dim"].is_null()), where,
             ": hidden_size (", c.d_model, ") is not divisible by num_attention_heads (", c.n_head,
             ") and no head_dim is given");
  c.head_dim = get_int(j, "head_dim", where, c.d_model / c.n_head);
  c.vocab_size = get_int(j, "vocab_size", where);
  c.max_positions = get_int(j, "max_position_embeddings", where);
  c.norm_eps = float(get_number(j, "rms_norm_eps", where, 1e-6));
  c.activation = parse_activation(j, "hidden_act", where, Activation::Silu);
  c.tie_embeddings = get_bool(j, "tie_word_embeddings", where, false);
  c.bos_token_id = token_id(j, "bos_token_id", where);
  c.eos_token_id = token_id(j, "eos_token_id", where);
  parse_rope(j, where, c);
  KILN_CHECK(c.rope_scaling.kind != RopeScaling::Yarn || std::string(family) == "deepseek_v3", where,
             ": rope_scaling type \"yarn\" is supported for deepseek_v3 only");
  KILN_CHECK(get_int(j, "pretraining_tp", where, 1) == 1, where, ": pretraining_tp other than 1 is not supported");
  return c;
}

json llama_like_json(const ModelConfig& c) {
  json j = {{"hidden_size", c.d_model},
            {"intermediate_size", c.d_ff},
            {"num_hidden_layers", c.n_layer},
            {"num_attention_heads", c.n_head},
            {"num_key_value_heads", c.n_kv_head},
            {"head_dim", c.head_dim},
            {"vocab_size", c.vocab_size},
            {"max_position_embeddings", c.max_positions},
            {"rms_norm_eps", c.norm_eps},
            {"hidden_act", activation_name(c.activation)},
            {"rope_theta", c.rope_theta},
            {"tie_word_embeddings", c.tie_embeddings},
            {"torch_dtype", "float32"}};
  const RopeScaling& r = c.rope_scaling;
  if (r.kind == RopeScaling::Linear) j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", r.factor}};
  if (r.kind == RopeScaling::Llama3)
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", r.factor},
                         {"low_freq_factor", r.low_freq_factor},
                         {"high_freq_factor", r.high_freq_factor},
                         {"original_max_position_embeddings", r.original_max_positions}};
  if (r.kind == RopeScaling::Yarn) {
    j["rope_scaling"] = {{"rope_type", "yarn"},
                         {"factor", r.factor},
                         {"original_max_position_embeddings", r.original_max_positions},
                         {"beta_fast", r.beta_fast},
                         {"beta_slow", r.beta_slow},
                         {"truncate", r.truncate}};
    if (r.mscale != 0) j["rope_scaling"]["mscale"] = r.mscale;
    if (r.mscale_all_dim != 0) j["rope_scaling"]["mscale_all_dim"] = r.mscale_all_dim;
    if (r.attention_factor != 0) j["rope_scaling"]["attention_factor"] = r.attention_factor;
  }
  if (r.kind == RopeScaling::None) j["rope_scaling"] = nullptr;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  return j;
}

std::string llama_file_name(const std::string& key) {
  return map_tensor_name(key,
                         {{"token_embd.weight", "model.embed_tokens.weight"},
                          {"output_norm.weight", "model.norm.weight"},
                          {"output.weight", "lm_head.weight"}},
                         {{"attn_norm", "input_layernorm"},    {"ffn_norm", "post_attention_layernorm"},
                          {"attn_q", "self_attn.q_proj"},      {"attn_k", "self_attn.k_proj"},
                          {"attn_v", "self_attn.v_proj"},      {"attn_output", "self_attn.o_proj"},
                          {"attn_q_norm", "self_attn.q_norm"}, {"attn_k_norm", "self_attn.k_norm"},
                          {"ffn_gate", "mlp.gate_proj"},       {"ffn_up", "mlp.up_proj"},
                          {"ffn_down", "mlp.down_proj"}},
                         "model.layers.", "Llama");
}

std::string moe_file_name(const std::string& key) {
  const size_t a = key.find('.', 4), b = key.rfind('.');
  if (key.rfind("blk.", 0) == 0 && a != std::string::npos && b > a) {
    const std::string prefix = "model.layers." + key.substr(4, a - 4) + ".mlp.";
    const std::string part = key.substr(a + 1, b - a - 1), suffix = key.substr(b);
    if (part == "ffn_gate_inp") return prefix + "gate" + suffix;
    if (part == "exp_probs_b") return prefix + "gate.e_score_correction_bias";
    for (const char* p : {"gate", "up", "down"}) {
      if (part == std::string("ffn_") + p + "_exps") return prefix + "experts.*." + p + "_proj" + suffix;
      if (part == std::string("ffn_") + p + "_shexp") return prefix + "shared_experts." + p + "_proj" + suffix;
    }
  }
  return llama_file_name(key);
}

}  // namespace kiln::hf
