// kiln chat-template: render a chat template (Jinja) the way kiln serve does, for a list of contexts
// (messages, add_generation_prompt, bos_token, tools, ...): prints a JSON array with, per context, the text or
// {"error": message}. The template comes from a model's tokenizer_config.json or a file; without either, kiln's
// SFT format (serve/chat.h). tests/serve/jinja_vs_hf.mjs compares it with @huggingface/jinja.
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "core/error.h"
#include "serve/chat.h"
#include "serve/jinja.h"
#include "tokenizer/tokenizer_config.h"
#include "tools/kiln/command.h"

namespace {

struct ChatTemplateOptions {
  std::string template_file, config, contexts;
};

std::string read_file(const std::string& path, const char* flag) {
  std::ifstream f(path, std::ios::binary);
  KILN_CHECK(f, flag, " ", path, ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void run(const ChatTemplateOptions& o) {
  using namespace kiln;
  KILN_CHECK(o.template_file.empty() || o.config.empty(), "give at most one of --template and --tokenizer-config");
  std::string source = kiln::serve::kSftChatTemplate;
  if (!o.template_file.empty()) source = read_file(o.template_file, "--template");
  if (!o.config.empty()) {
    const TokenizerConfig c = TokenizerConfig::load(o.config);
    KILN_CHECK(!c.chat_template.empty(), o.config, ": no chat_template");
    source = c.chat_template;
  }
  std::unique_ptr<serve::jinja::Template> t;
  try {
    t = std::make_unique<serve::jinja::Template>(source);
  } catch (const serve::jinja::Error& e) {
    throw Error(str(o.template_file.empty() ? o.config : o.template_file, ": ", e.what()));
  }
  nlohmann::ordered_json contexts;
  try {
    contexts = nlohmann::ordered_json::parse(read_file(o.contexts, "--contexts"));
  } catch (const nlohmann::json::exception& e) {
    throw Error(str("--contexts ", o.contexts, ": not JSON (", e.what(), ")"));
  }
  KILN_CHECK(contexts.is_array(), "--contexts ", o.contexts, ": expected a JSON array of objects");
  nlohmann::json out = nlohmann::json::array();
  for (const auto& c : contexts) {
    try {
      out.push_back(t->render(c));
    } catch (const serve::jinja::Error& e) {
      out.push_back({{"error", e.what()}});
    }
  }
  std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
}

kiln::cli::Command chat_template_cmd("chat-template", [](CLI::App& root) {
  auto o = std::make_shared<ChatTemplateOptions>();
  auto* c = root.add_subcommand("chat-template", "Render a chat template (Jinja) as kiln serve does, for test contexts");
  c->add_option("--template", o->template_file, "A file holding the template (default: kiln's SFT format)");
  c->add_option("--tokenizer-config", o->config, "Instead: a tokenizer_config.json whose chat_template to use");
  c->add_option("--contexts", o->contexts, "A JSON file: an array of contexts {messages, add_generation_prompt, ...}")
      ->required();
  c->callback([o] { run(*o); });
});

}  // namespace
