// DeepSeek-V3 (DeepseekV3ForCausalLM; Moonlight is one): Llama's pre-norm block with multi-head latent attention
// (nn/mla.h: q_lora_rank, kv_lora_rank, qk_nope/rope_head_dim, v_head_dim, rope_interleave) and yarn rotary
// scaling, multi-token prediction (num_nextn_predict_layers modules, stored as layers num_hidden_layers ..;
// their copies of the embedding and head are not read: kiln shares the main model's), and DeepSeekMoE layers
// (nn/moe.h) from first_k_dense_replace on.
#include "core/error.h"
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

using json = nlohmann::json;

ModelConfig parse(const json& j, const std::string& where) {
  LatentAttention m;
  m.q_lora_rank = hf::get_int(j, "q_lora_rank", where, 0);  // null: queries straight from the hidden state
  m.kv_lora_rank = hf::get_int(j, "kv_lora_rank", where);
  m.qk_nope_dim = hf::get_int(j, "qk_nope_head_dim", where);
  m.qk_rope_dim = hf::get_int(j, "qk_rope_head_dim", where);
  m.v_head_dim = hf::get_int(j, "v_head_dim", where);
  m.rope_interleave = hf::get_bool(j, "rope_interleave", where, true);
  KILN_CHECK(m.kv_lora_rank > 0, where, ": kv_lora_rank must be positive (got ", m.kv_lora_rank, ")");
  // Hugging Face's head_dim is the rotary width; kiln's is the q/k head (nope + rope).
  json k = j;
  k["head_dim"] = m.qk_nope_dim + m.qk_rope_dim;
  ModelConfig c = hf::parse_llama_like(k, where, "deepseek_v3");
  c.mla = m;
  c.n_kv_head = c.n_head;  // every head has its own k_nope and v (num_key_value_heads is not used)
  KILN_CHECK(!hf::get_bool(j, "attention_bias", where, false), where,
             ": attention_bias=true is not supported for deepseek_v3");
  c.mtp_depth = hf::get_int(j, "num_nextn_predict_layers", where, 0);
  // DeepSeekMoE from first_k_dense_replace on (the MTP layers included): sigmoid affinities, selection by
  // s + e_score_correction_bias (noaux_tc), group-limited routing, routed_scaling_factor. No n_routed_experts:
  // every layer dense.
  c.n_experts = hf::get_int(j, "n_routed_experts", where, 0);
  if (c.n_experts > 0) {
    c.first_k_dense_replace = hf::get_int(j, "first_k_dense_replace", where, 0);
    c.moe_top_k = hf::get_int(j, "num_experts_per_tok", where);
    c.moe_d_ff = hf::get_int(j, "moe_intermediate_size", where);
    c.n_shared_experts = hf::get_int(j, "n_shared_experts", where, 0);
    c.moe_groups = hf::get_int(j, "n_group", where, 1);
    c.moe_topk_groups = hf::get_int(j, "topk_group", where, 1);
    c.routed_scaling_factor = hf::get_number(j, "routed_scaling_factor", where, 1.0);
    c.norm_topk_prob = hf::get_bool(j, "norm_topk_prob", where, true);
    c.moe_scoring = RouterScoring::Sigmoid;
    c.moe_router_bias = true;
    KILN_CHECK(hf::get_int(j, "moe_layer_freq", where, 1) == 1, where, ": moe_layer_freq other than 1 is not supported");
    for (const char* k : {"topk_method", "scoring_func"})
      if (j.contains(k) && !j[k].is_null()) {
        const std::string want = k[0] == 't' ? "noaux_tc" : "sigmoid";
        KILN_CHECK(j[k].is_string() && j[k].get<std::string>() == want, where, ": ", k, " must be \"", want,
                   "\" (DeepSeek-V3's router)");
      }
  }
  return c;
}

json to_json(const ModelConfig& c) {
  json j = hf::llama_like_json(c);
  const LatentAttention& m = c.mla;
  j["head_dim"] = m.qk_rope_dim;  // Hugging Face's rotary width (kiln's head is nope + rope)
  j["num_key_value_heads"] = c.n_head;
  j["q_lora_rank"] = m.q_lora_rank ? json(m.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = m.kv_lora_rank;
  j["qk_nope_head_dim"] = m.qk_nope_dim;
  j["qk_rope_head_dim"] = m.qk_rope_dim;
  j["v_head_dim"] = m.v_head_dim;
  j["rope_interleave"] = m.rope_interleave;
  j["attention_bias"] = false;
  j["num_nextn_predict_layers"] = c.mtp_depth;
  if (c.n_experts > 0) {
    j["n_routed_experts"] = c.n_experts;
    j["first_k_dense_replace"] = c.first_k_dense_replace;
    j["num_experts_per_tok"] = c.moe_top_k;
    j["moe_intermediate_size"] = c.moe_d_ff;
    j["n_shared_experts"] = c.n_shared_experts;
    j["n_group"] = c.moe_groups;
    j["topk_group"] = c.moe_topk_groups;
    j["routed_scaling_factor"] = c.routed_scaling_factor;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["topk_method"] = "noaux_tc";
    j["scoring_func"] = "sigmoid";
    j["moe_layer_freq"] = 1;
  } else {
    j["n_routed_experts"] = nullptr;  // every layer dense
  }
  return j;
}

std::string file_name(const std::string& key) {
  // The MoE tensors as Hugging Face's DeepSeek-V3 names them (mlp.gate, mlp.experts.*, mlp.shared_experts).
  for (const char* part : {".ffn_gate_inp.", ".exp_probs_b.", "_exps.", "_shexp."})
    if (key.find(part) != std::string::npos) return hf::moe_file_name(key);
  return map_tensor_name(key,
                         {{"token_embd.weight", "model.embed_tokens.weight"},
                          {"output_norm.weight", "model.norm.weight"},
                          {"output.weight", "lm_head.weight"}},
                         {{"attn_norm", "input_layernorm"},
                          {"ffn_norm", "post_attention_layernorm"},
                          {"attn_q", "self_attn.q_proj"},
                          {"attn_q_a", "self_attn.q_a_proj"},
                          {"attn_q_a_norm", "self_attn.q_a_layernorm"},
                          {"attn_q_b", "self_attn.q_b_proj"},
                          {"attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"},
                          {"attn_kv_a_norm", "self_attn.kv_a_layernorm"},
                          {"attn_kv_b", "self_attn.kv_b_proj"},
                          {"attn_output", "self_attn.o_proj"},
                          {"ffn_gate", "mlp.gate_proj"},
                          {"ffn_up", "mlp.up_proj"},
                          {"ffn_down", "mlp.down_proj"},
                          // the multi-token-prediction layers' own tensors (llama.cpp's nextn names)
                          {"nextn.enorm", "enorm"},
                          {"nextn.hnorm", "hnorm"},
                          {"nextn.eh_proj", "eh_proj"},
                          {"nextn.shared_head_norm", "shared_head.norm"}},
                         "model.layers.", "DeepSeek-V3");
}

// The released checkpoints give each MTP layer its own copy of the embedding and the output head
// (model.layers.<n_layer + k>.embed_tokens / shared_head.head, the names Hugging Face's loader expects); the
// modules share the main model's, as the paper defines them.
std::vector<std::pair<std::string, std::string>> copies(const ModelConfig& c) {
  std::vector<std::pair<std::string, std::string>> r;
  for (int k = 0; k < c.mtp_depth; k++) {
    const std::string b = "model.layers." + std::to_string(c.n_layer + k) + ".";
    r.emplace_back(b + "embed_tokens.weight", "token_embd.weight");
    if (!c.tie_embeddings) r.emplace_back(b + "shared_head.head.weight", "output.weight");
  }
  return r;
}

}  // namespace

extern const Family kDeepseekV3Family = {"deepseek_v3", "DeepseekV3ForCausalLM", parse, to_json, file_name,
                                         copies};

}  // namespace kiln
