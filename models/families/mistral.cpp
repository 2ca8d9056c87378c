// Mistral (MistralForCausalLM): Llama's block with a sliding attention window (sliding_window, or null for
// full attention) and no biases.
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c = hf::parse_llama_like(j, where, "mistral");
  c.sliding_window = hf::get_int(j, "sliding_window", where, 0);
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  nlohmann::json j = hf::llama_like_json(c);
  j["sliding_window"] = c.sliding_window > 0 ? nlohmann::json(c.sliding_window) : nlohmann::json(nullptr);
  return j;
}

}  // namespace

extern const Family kMistralFamily = {"mistral", "MistralForCausalLM", parse, to_json, hf::llama_file_name};

}  // namespace kiln
