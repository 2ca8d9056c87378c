// Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (q_norm, k_norm, explicit head_dim) with a mixture-of-
// experts feed-forward: a softmax router (mlp.gate) over num_experts SwiGLU experts (mlp.experts.E.*), the top
// num_experts_per_tok per token, their probabilities renormalised when norm_topk_prob, no shared expert. Layer l
// is MoE when it is not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0; other layers keep the dense
// MLP of intermediate_size.
#include "core/error.h"
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c = hf::parse_llama_like(j, where, "qwen3_moe");
  c.qk_norm = true;
  c.qkv_bias = c.attn_out_bias = hf::get_bool(j, "attention_bias", where, false);
  KILN_CHECK(!hf::get_bool(j, "use_sliding_window", where, false), where,
             ": use_sliding_window=true (a window on some layers) is not supported");
  c.n_experts = hf::get_int(j, "num_experts", where);
  c.moe_top_k = hf::get_int(j, "num_experts_per_tok", where);
  c.moe_d_ff = hf::get_int(j, "moe_intermediate_size", where);
  c.norm_topk_prob = hf::get_bool(j, "norm_topk_prob", where, false);  // Qwen3MoeConfig's default
  c.moe_layer_step = hf::get_int(j, "decoder_sparse_step", where, 1);
  c.moe_scoring = RouterScoring::Softmax;
  if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
    KILN_CHECK(j["mlp_only_layers"].is_array(), where, ": field mlp_only_layers must be a list of layer indices");
    for (const auto& v : j["mlp_only_layers"]) {
      KILN_CHECK(v.is_number_integer(), where, ": field mlp_only_layers must be a list of layer indices");
      c.mlp_only_layers.push_back(v.get<int>());
    }
  }
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = hf::llama_like_json(c);
  j["attention_bias"] = c.qkv_bias;
  j["use_sliding_window"] = false;
  j["num_experts"] = c.n_experts;
  j["num_experts_per_tok"] = c.moe_top_k;
  j["moe_intermediate_size"] = c.moe_d_ff;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["decoder_sparse_step"] = c.moe_layer_step;
  j["mlp_only_layers"] = c.mlp_only_layers;
  return j;
}

}  // namespace

extern const Family kQwen3MoeFamily = {"qwen3_moe", "Qwen3MoeForCausalLM", parse, to_json, hf::moe_file_name};

}  // namespace kiln
