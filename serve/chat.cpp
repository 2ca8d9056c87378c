#include "serve/chat.h"

#include "core/error.h"
#include "serve/jinja.h"

namespace kiln::serve {

// Newlines are Jinja string escapes, not template text: trim_blocks would eat a newline after a tag.
const char* const kSftChatTemplate =
    "{% for message in messages %}{{ '<|' + message.role + '|>\\n' + message.content }}{% if message.role == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

struct ChatFormat::Impl {
  jinja::Template tmpl;
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
  try {
    impl_ = std::make_shared<Impl>(Impl{jinja::Template(source)});
  } catch (const jinja::Error& e) {
    throw Error(str("tokenizer_config.json chat_template: ", e.what()));
  }
}

std::string ChatFormat::render(const std::vector<ChatMessage>& messages) const {
  nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
  for (const auto& m : messages) msgs.push_back({{"role", m.role}, {"content", m.content}});
  const nlohmann::ordered_json ctx = {{"messages", msgs}, {"add_generation_prompt", true}, {"bos_token", bos_},
                              {"eos_token", eos_}};
  try {
    return impl_->tmpl.render(ctx);
  } catch (const jinja::Raised& e) {
    throw ApiError(400, std::string("the chat template refused the messages: ") + e.what(), "invalid_request_error",
                   "invalid_messages", "messages");
  } catch (const jinja::Error& e) {
    throw ApiError(400, std::string("the chat template failed on these messages: ") + e.what(),
                   "invalid_request_error", "invalid_messages", "messages");
  }
}

}  // namespace kiln::serve
