// gguf_tokenizer(): a Tokenizer as GGUF's tokenizer.ggml.* data. The expectations are the spellings, merges and
// flags of the files written here (GPT-2's byte-to-unicode alphabet from gguf_tiny_model.h's own table).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "gguf_tiny_model.h"
#include "io_test_helpers.h"
#include "models/gguf_vocab.h"
#include "tokenizer/bpe.h"

namespace kiln {
namespace {

using test::ScratchDir;

std::string json_str(const std::string& s) { return "\"" + s + "\""; }

TEST(GgufVocab, TokenizerJsonBecomesLlamaCppVocabulary) {
  ScratchDir dir("gguf_vocab");
  // 256 byte tokens (id = byte), four merges, a special and a non-special added token.
  std::vector<std::string> spelled;
  for (int b = 0; b < 256; b++) spelled.push_back(test::byte_token(b));
  const std::vector<std::string> merges = {"Ġ t", "h e", "Ġt he", "Ã ©"};
  for (const std::string& m : merges) spelled.push_back(m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1));
  spelled.push_back("<|endoftext|>");  // 260, special
  spelled.push_back("<tool>");         // 261, not special
  std::string vocab = "{";
  for (size_t id = 0; id < spelled.size(); id++) {
    std::string s = spelled[id] == "\"" ? "\\\"" : spelled[id] == "\\" ? "\\\\" : spelled[id];
    vocab += (id ? ", " : "") + json_str(s) + ": " + std::to_string(id);
  }
  std::string merge_list;
  for (size_t i = 0; i < merges.size(); i++) merge_list += (i ? ", " : "") + json_str(merges[i]);
  const std::string added = R"({"id": 260, "content": "<|endoftext|>", "special": true, "normalized": false,
      "lstrip": false, "rstrip": false, "single_word": false},
     {"id": 261, "content": "<tool>", "special": false, "normalized": false, "lstrip": false, "rstrip": false,
      "single_word": false})";
  test::write_bytes(dir / "tokenizer.json",
                    "{\"version\": \"1.0\", \"added_tokens\": [" + added +
                        "], \"normalizer\": null, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": "
                        "false, \"trim_offsets\": true, \"use_regex\": true}, \"post_processor\": null, \"decoder\": "
                        "{\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": " +
                        vocab + "}, \"merges\": [" + merge_list + "]}}");
  test::write_bytes(dir / "tokenizer_config.json",
                    R"({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": true,
                        "chat_template": "{{ messages }}"})");
  const Tokenizer tok = Tokenizer::load(dir.path.string());
  ASSERT_EQ(tok.vocab_size(), 262);

  const GgufTokenizer g = gguf_tokenizer(tok, 264, "test");  // two padding rows
  ASSERT_EQ(g.tokens.size(), 264u);
  for (size_t id = 0; id < spelled.size(); id++) EXPECT_EQ(g.tokens[id], spelled[id]) << "id " << id;
  EXPECT_EQ(g.tokens[262], "[PAD262]");
  EXPECT_EQ(g.tokens[263], "[PAD263]");
  EXPECT_EQ(g.merges, merges);
  ASSERT_EQ(g.token_type.size(), 264u);
  for (int id = 0; id < 260; id++) EXPECT_EQ(g.token_type[id], 1) << "id " << id;
  EXPECT_EQ(g.token_type[260], 3);  // control
  EXPECT_EQ(g.token_type[261], 4);  // user-defined
  EXPECT_EQ(g.token_type[262], 5);  // unused
  EXPECT_EQ(g.token_type[263], 5);
  EXPECT_EQ(g.bos_id, 260);
  EXPECT_EQ(g.eos_id, 260);
  EXPECT_TRUE(g.add_bos_token);
  EXPECT_EQ(g.pre, "gpt-2");
  EXPECT_EQ(g.chat_template, "{{ messages }}");

  // A model vocabulary smaller than the tokenizer's cannot hold it.
  try {
    gguf_tokenizer(tok, 261, "dir/x");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dir/x: the tokenizer has 262 tokens but the model's vocab_size is 261"),
              std::string::npos)
        << e.what();
  }
}

TEST(GgufVocab, WithoutConfigBosIsTheEndOfTextAndNotAdded) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; b++) tokens.push_back(std::string(1, char(b)));
  tokens.push_back(" a");
  tokens.push_back("<|endoftext|>");
  const uint32_t space = uint32_t(' '), a = uint32_t('a');
  const Tokenizer tok = Tokenizer::from_parts(tokens, {{space, a}}, {{"<|endoftext|>", 257}}, {}, "parts", false,
                                              PreTokenizer::kQwen2);
  const GgufTokenizer g = gguf_tokenizer(tok, 258, "parts");
  EXPECT_EQ(g.tokens[32], "Ġ");
  EXPECT_EQ(g.tokens[256], "Ġa");
  EXPECT_EQ(g.tokens[257], "<|endoftext|>");
  EXPECT_EQ(g.merges, std::vector<std::string>{"Ġ a"});
  EXPECT_EQ(g.token_type[257], 3);
  EXPECT_EQ(g.eos_id, 257);
  EXPECT_EQ(g.bos_id, 257);
  EXPECT_FALSE(g.add_bos_token);
  EXPECT_EQ(g.pre, "qwen2");
  EXPECT_TRUE(g.chat_template.empty());
}

}  // namespace
}  // namespace kiln
