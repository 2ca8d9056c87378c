// Llama (LlamaForCausalLM): RMSNorm, rotary positions (with Llama 3's rope_scaling), grouped-query attention,
// SwiGLU, an untied head by default; attention_bias puts biases on q/k/v/o, mlp_bias on the MLP.
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c = hf::parse_llama_like(j, where, "llama");
  c.qkv_bias = c.attn_out_bias = hf::get_bool(j, "attention_bias", where, false);
  c.ffn_bias = hf::get_bool(j, "mlp_bias", where, false);
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = hf::llama_like_json(c);
  j["attention_bias"] = c.qkv_bias;
  j["mlp_bias"] = c.ffn_bias;
  return j;
}

}  // namespace

extern const Family kLlamaFamily = {"llama", "LlamaForCausalLM", parse, to_json, hf::llama_file_name};

}  // namespace kiln
