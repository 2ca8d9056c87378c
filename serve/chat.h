// Turning chat messages into the prompt text a model was trained on: the model's own chat_template (Jinja,
// from tokenizer_config.json, rendered by serve/jinja.h), or kiln's SFT format (train/sft.h) for a model
// without one:
//   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}<|endoftext|>...<|assistant|>\n
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "serve/request.h"
#include "tokenizer/bpe.h"

namespace kiln::serve {

// kiln's SFT conversation format as a Jinja template (what the default renders).
extern const char* const kSftChatTemplate;

class ChatFormat {
 public:
  // The tokenizer's chat_template when it has one, else kiln's SFT format. Throws kiln::Error if the
  // template does not parse.
  static ChatFormat for_tokenizer(const Tokenizer& tok);
  explicit ChatFormat(const std::string& jinja_source, std::string bos = "", std::string eos = "<|endoftext|>");
  // The prompt for `messages`, ending with the assistant's turn opened. Throws ApiError (400) when the
  // template raises an exception (e.g. "roles must alternate") or fails on these messages.
  std::string render(const std::vector<ChatMessage>& messages) const;
  bool is_default() const { return default_; }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  std::string bos_, eos_;
  bool default_ = false;
};

}  // namespace kiln::serve
