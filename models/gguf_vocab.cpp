#include "models/gguf_vocab.h"

#include "core/error.h"

namespace kiln {

GgufTokenizer gguf_tokenizer(const Tokenizer& tok, int vocab_size, const std::string& where) {
  const int n = tok.vocab_size();
  KILN_CHECK(n <= vocab_size, where, ": the tokenizer has ", n, " tokens but the model's vocab_size is ", vocab_size);
  GgufTokenizer g;
  g.tokens.reserve(size_t(vocab_size));
  for (int id = 0; id < n; id++) g.tokens.push_back(tok.spelling(uint32_t(id)));
  for (int id = n; id < vocab_size; id++) g.tokens.push_back("[PAD" + std::to_string(id) + "]");
  g.merges.reserve(tok.num_merges());
  for (const auto& [a, b] : tok.merges()) g.merges.push_back(g.tokens[a] + " " + g.tokens[b]);
  const std::vector<TokenType> types = tok.token_types();
  g.token_type.assign(size_t(vocab_size), 5);
  for (int id = 0; id < n; id++) g.token_type[size_t(id)] = int32_t(types[size_t(id)]);
  if (tok.eot_id()) g.eos_id = int(*tok.eot_id());
  g.bos_id = tok.bos_id() ? int(*tok.bos_id()) : g.eos_id;
  const std::vector<uint32_t>& prefix = tok.prefix_ids();
  g.add_bos_token = prefix.size() == 1 && tok.bos_id() && prefix[0] == *tok.bos_id();
  g.pre = gguf_pre_name(tok.pre_tokenizer());
  if (tok.config()) g.chat_template = tok.config()->chat_template;
  return g;
}

}  // namespace kiln
