// tokenizer_config.json, the file Hugging Face's transformers keeps next to tokenizer.json: the bos/eos
// tokens, whether bos/eos are added around a text, the chat template(s) and the model's context length.
// Only the fields kiln uses are read; the file's text is kept so that saving writes it back unchanged.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace kiln {

struct TokenizerConfig {
  // Token contents (the file may give a string or an AddedToken object {"content": ...}); absent or null:
  // nullopt.
  std::optional<std::string> bos_token, eos_token;
  // Absent: nullopt (then the tokenizer.json post_processor decides what is added).
  std::optional<bool> add_bos_token, add_eos_token;
  // The template used when none is named: chat_template as a string, or the entry named "default" of a
  // list of {name, template}; empty if neither.
  std::string chat_template;
  // Every template by name ("default" for a plain string).
  std::map<std::string, std::string> chat_templates;
  // Absent, or Hugging Face's "unlimited" placeholder (1e30): nullopt.
  std::optional<int64_t> model_max_length;
  // The file as read.
  std::string text;

  // Throws kiln::Error naming `source` and the field on malformed JSON or a field of the wrong type.
  static TokenizerConfig parse(const std::string& text, const std::string& source);
  static TokenizerConfig load(const std::string& path);
};

}  // namespace kiln
