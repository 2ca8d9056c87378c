// Qwen3 (Qwen3ForCausalLM): Llama's block with a per-head RMSNorm of the queries and keys (q_norm, k_norm)
// before the rotation, an explicit head_dim, and attention_bias as Llama's.
#include "core/error.h"
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c = hf::parse_llama_like(j, where, "qwen3");
  c.qk_norm = true;
  c.qkv_bias = c.attn_out_bias = hf::get_bool(j, "attention_bias", where, false);
  KILN_CHECK(!hf::get_bool(j, "use_sliding_window", where, false), where,
             ": use_sliding_window=true (a window on some layers) is not supported");
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = hf::llama_like_json(c);
  j["attention_bias"] = c.qkv_bias;
  j["use_sliding_window"] = false;
  return j;
}

}  // namespace

extern const Family kQwen3Family = {"qwen3", "Qwen3ForCausalLM", parse, to_json, hf::llama_file_name};

}  // namespace kiln
