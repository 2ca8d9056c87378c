#include "models/config.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"

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

GPT2Config GPT2Config::from_json_text(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(where, ": malformed JSON (", e.what(), ")");
  }
  KILN_CHECK(j.is_object(), where, ": expected a JSON object");
  GPT2Config c;
  auto get_int = [&](const char* field, int& dst) {
    KILN_CHECK(j.contains(field), where, ": missing field ", field);
    KILN_CHECK(j[field].is_number_integer(), where, ": field ", field, " must be an integer");
    int64_t v = j[field].get<int64_t>();
    KILN_CHECK(v > 0 && v < (int64_t(1) << 30), where, ": field ", field, " out of range (", v, ")");
    dst = int(v);
  };
  get_int("n_layer", c.n_layer);
  get_int("n_head", c.n_head);
  get_int("n_embd", c.n_embd);
  get_int("vocab_size", c.vocab_size);
  get_int("n_positions", c.n_positions);
  if (j.contains("layer_norm_epsilon")) {
    KILN_CHECK(j["layer_norm_epsilon"].is_number(), where, ": field layer_norm_epsilon must be a number");
    c.layer_norm_epsilon = j["layer_norm_epsilon"].get<float>();
  }
  if (j.contains("activation_function")) {
    auto a = j["activation_function"];
    KILN_CHECK(a.is_string() && (a == "gelu_new" || a == "gelu_pytorch_tanh"), where,
               ": activation_function must be gelu_new (GPT-2's tanh GELU)");
  }
  c.validate(where);
  return c;
}

GPT2Config GPT2Config::load(const std::string& path) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = (std::filesystem::path(path) / "config.json").string();
  KILN_CHECK(std::filesystem::exists(file), file, ": no such file");
  return from_json_text(read_file(file), file);
}

std::string GPT2Config::to_json() const {
  json j = {
      {"architectures", {"GPT2LMHeadModel"}},
      {"model_type", "gpt2"},
      {"activation_function", "gelu_new"},
      {"n_layer", n_layer},
      {"n_head", n_head},
      {"n_embd", n_embd},
      {"n_inner", nullptr},
      {"vocab_size", vocab_size},
      {"n_positions", n_positions},
      {"n_ctx", n_positions},
      {"layer_norm_epsilon", layer_norm_epsilon},
      {"resid_pdrop", 0.0},
      {"embd_pdrop", 0.0},
      {"attn_pdrop", 0.0},
      {"initializer_range", 0.02},
      {"scale_attn_weights", true},
      {"tie_word_embeddings", true},
      {"bos_token_id", vocab_size - 1},
      {"eos_token_id", vocab_size - 1},
      {"torch_dtype", "float32"},
  };
  return j.dump(2) + "\n";
}

}  // namespace kiln
