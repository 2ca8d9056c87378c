// What the Llama-style families share: the config.json keys of LlamaConfig (Mistral, Qwen2 and Qwen3 add to
// them) and the tensor names of *ForCausalLM checkpoints. Each family file states only how it differs.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "models/model_config.h"

namespace kiln::hf {

// Reads hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
// vocab_size, max_position_embeddings, rms_norm_eps, hidden_act, rope_theta / rope_scaling (or transformers 5's
// rope_parameters), tie_word_embeddings, bos/eos_token_id. Biases and sliding windows are the caller's.
ModelConfig parse_llama_like(const nlohmann::json& j, const std::string& where, const char* family);
nlohmann::json llama_like_json(const ModelConfig& c);
// "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight", etc.
std::string llama_file_name(const std::string& key);
// llama_file_name plus the mixture-of-experts tensors of Qwen3MoeForCausalLM / DeepseekV3ForCausalLM:
//   ffn_gate_inp -> mlp.gate, exp_probs_b.bias -> mlp.gate.e_score_correction_bias,
//   ffn_{gate,up,down}_exps -> mlp.experts.*.{gate,up,down}_proj (one file tensor per expert),
//   ffn_{gate,up,down}_shexp -> mlp.shared_experts.{gate,up,down}_proj.
std::string moe_file_name(const std::string& key);

// Typed field access with one-line errors naming the field.
int get_int(const nlohmann::json& j, const char* field, const std::string& where, int fallback = -1);
double get_number(const nlohmann::json& j, const char* field, const std::string& where, double fallback);
bool get_bool(const nlohmann::json& j, const char* field, const std::string& where, bool fallback);
Activation parse_activation(const nlohmann::json& j, const char* field, const std::string& where, Activation fallback);
const char* activation_name(Activation a);

}  // namespace kiln::hf
