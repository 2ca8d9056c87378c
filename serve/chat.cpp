#include "serve/chat.h"

#include "core/error.h"

namespace kiln::serve {

const char* const kSftChatTemplate =
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}"
    "{% if message.role == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

struct ChatFormat::Impl {
  std::string source;
};

ChatFormat ChatFormat::for_tokenizer(const Tokenizer& tok) {
  std::string eos = "<|endoftext|>", bos;
  if (tok.eot_id()) eos = tok.spelling(*tok.eot_id());
  if (tok.config()) {
    if (tok.config()->eos_token) eos = *tok.config()->eos_token;
    if (tok.config()->bos_token) bos = *tok.config()->bos_token;
  }
  if (tok.config() && !tok.config()->chat_template.empty()) return ChatFormat(tok.config()->chat_template, bos, eos);
  ChatFormat f(kSftChatTemplate, bos, eos);
  f.default_ = true;
  return f;
}

ChatFormat::ChatFormat(const std::string& source, std::string bos, std::string eos)
    : bos_(std::move(bos)), eos_(std::move(eos)) {
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  impl_ = impl;
}

std::string ChatFormat::render(const std::vector<ChatMessage>& messages) const {
  // kiln's SFT format (until the template interpreter renders impl_->source).
  std::string out;
  for (const auto& m : messages) {
    const std::string role = m.role == "tool" ? "user" : m.role;
    out += "<|" + role + "|>\n" + m.content;
    out += role == "assistant" ? eos_ : "\n";
  }
  return out + "<|assistant|>\n";
}

}  // namespace kiln::serve
