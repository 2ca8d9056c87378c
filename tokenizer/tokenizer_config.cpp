#include "tokenizer/tokenizer_config.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/quote.h"

namespace kiln {

namespace {
using json = nlohmann::json;

std::optional<std::string> token_field(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  KILN_CHECK(v.is_object() && v.contains("content") && v["content"].is_string(), source, ": ", key,
             " must be a string or an AddedToken object with a \"content\" string");
  return v["content"].get<std::string>();
}

std::optional<bool> bool_field(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  KILN_CHECK(j[key].is_boolean(), source, ": ", key, " must be true or false, got ", j[key].dump());
  return j[key].get<bool>();
}
}  // namespace

TokenizerConfig TokenizerConfig::parse(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail(source, ": malformed JSON (", e.what(), ")");
  }
  KILN_CHECK(j.is_object(), source, ": expected a JSON object");
  TokenizerConfig c;
  c.text = text;
  c.bos_token = token_field(j, "bos_token", source);
  c.eos_token = token_field(j, "eos_token", source);
  c.add_bos_token = bool_field(j, "add_bos_token", source);
  c.add_eos_token = bool_field(j, "add_eos_token", source);
  if (j.contains("chat_template") && !j["chat_template"].is_null()) {
    const json& t = j["chat_template"];
    if (t.is_string()) {
      c.chat_template = t.get<std::string>();
      c.chat_templates["default"] = c.chat_template;
    } else {
      KILN_CHECK(t.is_array(), source, ": chat_template must be a string or a list of {name, template}");
      for (size_t i = 0; i < t.size(); i++) {
        const json& e = t[i];
        KILN_CHECK(e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("template") &&
                       e["template"].is_string(),
                   source, ": chat_template[", i, "] must be {\"name\": string, \"template\": string}");
        std::string name = e["name"].get<std::string>();
        KILN_CHECK(c.chat_templates.emplace(name, e["template"].get<std::string>()).second, source,
                   ": chat_template names ", quote_name(name), " twice");
      }
      if (auto it = c.chat_templates.find("default"); it != c.chat_templates.end()) c.chat_template = it->second;
    }
  }
  if (j.contains("model_max_length") && !j["model_max_length"].is_null()) {
    const json& m = j["model_max_length"];
    KILN_CHECK(m.is_number() && m.get<double>() >= 0, source, ": model_max_length must be a non-negative number, got ",
               m.dump());
    // transformers writes int(1e30) when the length is unknown.
    if (m.is_number_unsigned()) {
      if (m.get<uint64_t>() < (uint64_t(1) << 62)) c.model_max_length = int64_t(m.get<uint64_t>());
    } else if (m.is_number_integer()) {
      c.model_max_length = m.get<int64_t>();
    } else if (m.get<double>() < 9.0e18) {
      KILN_CHECK(m.get<double>() == double(int64_t(m.get<double>())), source, ": model_max_length must be an integer");
      c.model_max_length = int64_t(m.get<double>());
    }
  }
  return c;
}

TokenizerConfig TokenizerConfig::load(const std::string& path) {
  KILN_CHECK(file_exists(path), path, ": no such file");
  return parse(read_file(path), path);
}

}  // namespace kiln
