#include "models/config.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "models/family.h"

namespace kiln {

using json = nlohmann::json;

void GPT2Config::validate(const std::string& where) const {
  auto positive = [&](const char* field, int v) { KILN_CHECK(v > 0, where, ": ", field, " must be positive (got ", v, ")"); };
  positive("n_layer", n_layer);
  positive("n_head", n_head);
  positive("n_embd", n_embd);
  positive("vocab_size", vocab_size);
  positive("n_positions", n_positions);
  KILN_CHECK(n_embd % n_head == 0, where, ": n_embd (", n_embd, ") is not divisible by n_head (", n_head, ")");
  KILN_CHECK(layer_norm_epsilon > 0 && layer_norm_epsilon < 1, where, ": layer_norm_epsilon must be in (0, 1) (got ",
             layer_norm_epsilon, ")");
  KILN_CHECK(int64_t(vocab_size) * n_embd < (int64_t(1) << 34), where, ": model too large");
}

int64_t GPT2Config::num_params() const {
  int64_t C = n_embd;
  int64_t per_layer = 2 * C + C * 3 * C + 3 * C + C * C + C + 2 * C + C * 4 * C + 4 * C + 4 * C * C + C;
  return int64_t(vocab_size) * C + int64_t(n_positions) * C + n_layer * per_layer + 2 * C;
}

ModelConfig GPT2Config::model() const {
  validate("GPT-2 config");
  nlohmann::json j = {{"model_type", "gpt2"}, {"n_layer", n_layer}, {"n_head", n_head}, {"n_embd", n_embd},
                      {"vocab_size", vocab_size}, {"n_positions", n_positions}, {"layer_norm_epsilon", layer_norm_epsilon}};
  return parse_model_config(j.dump(), "GPT-2 config");
}

GPT2Config GPT2Config::from(const ModelConfig& m, const std::string& where) {
  KILN_CHECK(m.family == "gpt2", where, ": a GPT-2 model is needed here, this is ", m.family);
  KILN_CHECK(m.d_ff == 4 * m.d_model && m.activation == Activation::GeluTanh, where,
             ": activation_function must be gelu_new and n_inner 4·n_embd for this GPT-2 path (the GPU model)");
  GPT2Config c;
  c.n_layer = m.n_layer;
  c.n_head = m.n_head;
  c.n_embd = m.d_model;
  c.vocab_size = m.vocab_size;
  c.n_positions = m.max_positions;
  c.layer_norm_epsilon = m.norm_eps;
  return c;
}

GPT2Config GPT2Config::from_json_text(const std::string& text, const std::string& where) {
  return from(parse_model_config(text, where), where);
}

GPT2Config GPT2Config::load(const std::string& path) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = (std::filesystem::path(path) / "config.json").string();
  KILN_CHECK(std::filesystem::exists(file), file, ": no such file");
  return from_json_text(read_file(file), file);
}

std::string GPT2Config::to_json() const { return model_config_json(model()); }

}  // namespace kiln
