// Qwen2 (Qwen2ForCausalLM): Llama's block with biases on the q, k and v projections (none on o_proj).
// Its sliding window applies only to some layers (use_sliding_window, max_window_layers): not supported.
#include "core/error.h"
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c = hf::parse_llama_like(j, where, "qwen2");
  c.qkv_bias = true;
  KILN_CHECK(!hf::get_bool(j, "use_sliding_window", where, false), where,
             ": use_sliding_window=true (a window on some layers) is not supported");
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = hf::llama_like_json(c);
  j["use_sliding_window"] = false;
  return j;
}

}  // namespace

extern const Family kQwen2Family = {"qwen2", "Qwen2ForCausalLM", parse, to_json, hf::llama_file_name};

}  // namespace kiln
