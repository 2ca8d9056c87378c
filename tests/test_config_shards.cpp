// config.json (Hugging Face GPT-2) and token shards (llm.c layout): real files read, bad ones refused with
// the file named.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "io_test_helpers.h"
#include "models/config.h"
#include "train/shards.h"

namespace kiln {
namespace {

using test::ScratchDir;

// openai-community/gpt2's config.json as published on the Hugging Face hub.
const char* kHubGpt2Config = R"({
  "activation_function": "gelu_new",
  "architectures": ["GPT2LMHeadModel"],
  "attn_pdrop": 0.1,
  "bos_token_id": 50256,
  "embd_pdrop": 0.1,
  "eos_token_id": 50256,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_ctx": 1024,
  "n_embd": 768,
  "n_head": 12,
  "n_layer": 12,
  "n_positions": 1024,
  "resid_pdrop": 0.1,
  "summary_activation": null,
  "summary_first_dropout": 0.1,
  "summary_proj_to_labels": true,
  "summary_type": "cls_index",
  "summary_use_proj": true,
  "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257
})";

TEST(Gpt2Config, ReadsTheHubConfig) {
  ScratchDir dir("config_hub");
  test::write_bytes(dir / "config.json", kHubGpt2Config);
  GPT2Config c = GPT2Config::load(dir.path.string());
  EXPECT_EQ(c.n_layer, 12);
  EXPECT_EQ(c.n_head, 12);
  EXPECT_EQ(c.n_embd, 768);
  EXPECT_EQ(c.vocab_size, 50257);
  EXPECT_EQ(c.n_positions, 1024);
  EXPECT_FLOAT_EQ(c.layer_norm_epsilon, 1e-5f);
  // GPT-2 small's published parameter count (llm.c prints it as num_parameters: 124439808).
  EXPECT_EQ(c.num_params(), 124439808);
  GPT2Config back = GPT2Config::from_json_text(c.to_json(), "to_json");
  EXPECT_EQ(back.n_layer, c.n_layer);
  EXPECT_EQ(back.n_embd, c.n_embd);
  EXPECT_EQ(back.vocab_size, c.vocab_size);
  EXPECT_EQ(back.layer_norm_epsilon, c.layer_norm_epsilon);
}

TEST(Gpt2Config, BadConfigsNameTheFileAndField) {
  ScratchDir dir("config_bad");
  auto expect_bad = [&](const std::string& name, std::string text, const std::string& field) {
    std::string path = dir / name;
    test::write_bytes(path, text);
    EXPECT_KILN_ERROR(GPT2Config::load(path), name);
    if (!field.empty()) EXPECT_KILN_ERROR(GPT2Config::load(path), field);
  };
  std::string hub = kHubGpt2Config;
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = hub;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  expect_bad("no_n_head.json", replace("\"n_head\": 12,", ""), "n_head");
  expect_bad("no_vocab.json", replace(",\n  \"vocab_size\": 50257", ""), "vocab_size");
  expect_bad("indivisible.json", replace("\"n_head\": 12", "\"n_head\": 10"), "divisible");
  expect_bad("negative.json", replace("\"n_layer\": 12", "\"n_layer\": -1"), "n_layer");
  expect_bad("string.json", replace("\"n_embd\": 768", "\"n_embd\": \"768\""), "n_embd");
  expect_bad("activation.json", replace("gelu_new", "relu"), "activation_function");
  expect_bad("truncated.json", hub.substr(0, hub.size() / 2), "");
  expect_bad("array.json", "[1, 2, 3]", "");
  EXPECT_KILN_ERROR(GPT2Config::load(dir / "absent.json"), "absent.json");
}

// --- Token shards, built byte by byte here (not with write_shard) from the llm.c layout.

std::string shard_bytes(int32_t magic, int32_t version, int32_t count, const std::vector<uint32_t>& tokens) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::string out(reinterpret_cast<const char*>(header.data()), 1024);
  for (uint32_t t : tokens) {
    if (version == 1) {
      uint16_t v = uint16_t(t);
      out.append(reinterpret_cast<const char*>(&v), 2);
    } else {
      out.append(reinterpret_cast<const char*>(&t), 4);
    }
  }
  return out;
}

TEST(TokenShardFiles, ReadsLlmcLayout) {
  ScratchDir dir("shards_ok");
  std::vector<uint32_t> tokens = {50256, 15496, 11, 995, 0, 65535};
  test::write_bytes(dir / "a.bin", shard_bytes(20240520, 1, 6, tokens));
  TokenShard s(dir / "a.bin");
  ASSERT_EQ(s.size(), 6);
  for (size_t i = 0; i < tokens.size(); i++) EXPECT_EQ(s[int64_t(i)], tokens[i]);
  EXPECT_KILN_ERROR(s.check_vocab(50257), "a.bin");  // 65535 is out of GPT-2's vocabulary
  EXPECT_KILN_ERROR(s.check_vocab(50257), "position 5");
  std::vector<uint32_t> big = {1, 100000, 3};
  test::write_bytes(dir / "b.bin", shard_bytes(20240520, 2, 3, big));
  TokenShard b(dir / "b.bin");
  EXPECT_EQ(b[1], 100000u);
  b.check_vocab(100001);
  // write_shard's output has the same bytes as the hand-built file.
  write_shard(dir / "c.bin", tokens);
  EXPECT_EQ(test::slurp(dir / "c.bin"), test::slurp(dir / "a.bin"));
}

TEST(TokenShardFiles, BadShardsNameTheFile) {
  ScratchDir dir("shards_bad");
  std::vector<uint32_t> tokens = {1, 2, 3, 4};
  std::string good = shard_bytes(20240520, 1, 4, tokens);
  auto expect_bad = [&](const std::string& name, const std::string& bytes) {
    test::write_bytes(dir / name, bytes);
    EXPECT_KILN_ERROR(TokenShard s(dir / name), name);
  };
  expect_bad("magic.bin", shard_bytes(20240521, 1, 4, tokens));
  expect_bad("version.bin", shard_bytes(20240520, 3, 4, tokens));
  expect_bad("negative.bin", shard_bytes(20240520, 1, -4, tokens));
  expect_bad("longer.bin", shard_bytes(20240520, 1, 5, tokens));
  expect_bad("empty.bin", "");
  for (size_t cut : {size_t(3), size_t(512), size_t(1023), size_t(1024), good.size() - 1})
    expect_bad("cut" + std::to_string(cut) + ".bin", good.substr(0, cut));
  expect_bad("extra.bin", good + "zz");
  EXPECT_KILN_ERROR(TokenShard s(dir / "absent.bin"), "absent.bin");
}

}  // namespace
}  // namespace kiln
