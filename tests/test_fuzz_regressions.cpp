// Inputs the fuzzers (fuzz/, scripts/fuzz.sh) or the review around them found to break the parsers, each now
// refused with a one-line kiln::Error naming the file; plus the in-memory parse entries the fuzzers call, checked
// against the file paths that use them.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "core/gguf.h"
#include "core/safetensors.h"
#include "io_test_helpers.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "tokenizer/bpe.h"

namespace kiln {
namespace {

using test::ScratchDir;

// The message of the kiln::Error that f throws ("" and a test failure if none).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no kiln::Error";
  return "";
}

bool one_line(const std::string& m) { return m.find('\n') == std::string::npos && m.find('\r') == std::string::npos; }

// ---- config.json ------------------------------------------------------------------------------------------

std::string llama_config(const std::string& sizes) {
  return R"({"model_type": "llama", "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 256, )" +
         sizes + "}";
}

TEST(FuzzRegressions, ConfigHeadsTimesHeadDimOverflowingIntIsRefused) {
  // 65536 heads of 65536: q_dim() = n_head * head_dim overflowed int (UBSan: signed integer overflow).
  const std::string m = error_of([] {
    parse_model_config(llama_config(R"("hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 65536,
                                       "num_key_value_heads": 65536, "head_dim": 65536)"),
                       "c/config.json");
  });
  EXPECT_NE(m.find("c/config.json"), std::string::npos) << m;
  EXPECT_NE(m.find("too large"), std::string::npos) << m;
  EXPECT_TRUE(one_line(m)) << m;
}

TEST(FuzzRegressions, ConfigParameterCountOverflowingInt64IsRefused) {
  // 2^29 layers of width 2^14: the layer count times a layer's parameters overflowed int64 in num_params().
  const std::string m = error_of([] {
    parse_model_config(llama_config(R"("hidden_size": 16384, "num_hidden_layers": 536870912,
                                       "num_attention_heads": 128)"),
                       "c/config.json");
  });
  EXPECT_NE(m.find("c/config.json"), std::string::npos) << m;
  EXPECT_NE(m.find("2^40"), std::string::npos) << m;
}

TEST(FuzzRegressions, ConfigValuesWithNewlinesStayOnOneLine) {
  // fuzz_config's first crash: a "\n" in hidden_act went into the message raw.
  for (const char* field : {R"("hidden_act": "s\nu")", R"("rope_scaling": {"rope_type": "y\narn", "factor": 2})"}) {
    const std::string m = error_of([&] {
      parse_model_config(llama_config(std::string(R"("hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, )") + field),
                         "c/config.json");
    });
    EXPECT_TRUE(one_line(m)) << m;
    EXPECT_NE(m.find("c/config.json"), std::string::npos) << m;
  }
  const std::string m = error_of([] { parse_model_config(R"({"model_type": "gpt\n2"})", "c/config.json"); });
  EXPECT_TRUE(one_line(m)) << m;
  EXPECT_NE(m.find(R"("gpt\x0a2")"), std::string::npos) << m;
}

TEST(FuzzRegressions, ConfigParameterCountOfLlama3_8B) {
  // meta-llama/Meta-Llama-3-8B's config.json: Meta publishes 8,030,261,248 parameters; the count is now computed
  // in 128-bit arithmetic, which must not change it.
  const ModelConfig c = parse_model_config(
      R"({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
          "tie_word_embeddings": false})",
      "llama3-8b/config.json");
  EXPECT_EQ(c.num_params(), 8030261248);
}

// ---- tokenizer.json ---------------------------------------------------------------------------------------

std::string tokenizer_with_vocab(const std::string& vocab, const std::string& merges = "[]") {
  return R"({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": )" + vocab +
         R"(, "merges": )" + merges + "}}";
}

TEST(FuzzRegressions, TokenizerHugeIdIsRefusedBeforeSizingTheTable) {
  // One token with id 2e9 made the loader resize its tables to 2e9 entries (64 GB; ASan: out of memory).
  const std::string m = error_of([] { Tokenizer::parse_hf_json(tokenizer_with_vocab(R"({"a": 2000000000})"), "t.json"); });
  EXPECT_NE(m.find("t.json"), std::string::npos) << m;
  EXPECT_NE(m.find("2000000000"), std::string::npos) << m;
  EXPECT_NE(m.find("lists 1 tokens"), std::string::npos) << m;
  // An added token's id is bounded the same way.
  const std::string a = error_of([] {
    Tokenizer::parse_hf_json(R"({"pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"id": 1500000000,
      "content": "<s>"}], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})",
                             "t.json");
  });
  EXPECT_NE(a.find("added_tokens[0]"), std::string::npos) << a;
}

TEST(FuzzRegressions, TokenizerNamesWithNewlinesStayOnOneLine) {
  // Token spellings from the file went into messages raw: a "\n" in a key broke the message over two lines.
  const std::string bad_id = error_of([] { Tokenizer::parse_hf_json(tokenizer_with_vocab(R"({"a\nb": -1})"), "t.json"); });
  EXPECT_TRUE(one_line(bad_id)) << bad_id;
  EXPECT_NE(bad_id.find(R"("a\x0ab")"), std::string::npos) << bad_id;
  const std::string bad_merge =
      error_of([] { Tokenizer::parse_hf_json(tokenizer_with_vocab(R"({"a": 0})", R"(["a\n b"])"), "t.json"); });
  EXPECT_TRUE(one_line(bad_merge)) << bad_merge;
  EXPECT_NE(bad_merge.find("t.json"), std::string::npos) << bad_merge;
  const std::string bad_type = error_of([] {
    Tokenizer::parse_hf_json(R"({"model": {"type": "Word\nPiece", "vocab": {}}})", "t.json");
  });
  EXPECT_TRUE(one_line(bad_type)) << bad_type;
}

TEST(FuzzRegressions, TokenizerFileAndTextLoadTheSame) {
  ScratchDir dir("fuzz_tok");
  const std::string text = tokenizer_with_vocab(R"({"a": 0, "b": 7})");
  test::write_bytes(dir / "tokenizer.json", text);
  const std::string from_file = error_of([&] { Tokenizer::load_hf_json(dir / "tokenizer.json"); });
  const std::string from_text = error_of([&] { Tokenizer::parse_hf_json(text, dir / "tokenizer.json"); });
  EXPECT_EQ(from_file, from_text);
  EXPECT_NE(from_file.find("lists 2 tokens"), std::string::npos) << from_file;
}

// ---- GGUF -------------------------------------------------------------------------------------------------

template <class T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void put_str(std::string& s, const std::string& v) {
  put<uint64_t>(s, v.size());
  s += v;
}

TEST(FuzzRegressions, GgufKeysAndNamesWithNewlinesStayOnOneLine) {
  // A duplicate key "general.arc\nhitecture" (fuzz_gguf's first crash) gave a two-line message.
  std::string f = "GGUF";
  put<uint32_t>(f, 3);
  put<uint64_t>(f, 0);  // tensors
  put<uint64_t>(f, 2);  // keys
  for (int i = 0; i < 2; i++) {
    put_str(f, "general.arc\nhitecture");
    put<uint32_t>(f, uint32_t(GgufValueType::U32));
    put<uint32_t>(f, 1);
  }
  std::string m = error_of([&] { GgufFile::from_bytes(f, "x.gguf"); });
  EXPECT_TRUE(one_line(m)) << m;
  EXPECT_NE(m.find(R"(x.gguf: duplicate metadata key "general.arc\x0ahitecture")"), std::string::npos) << m;

  // A tensor name with a newline whose data lies past the end of the file.
  std::string g = "GGUF";
  put<uint32_t>(g, 3);
  put<uint64_t>(g, 1);
  put<uint64_t>(g, 0);
  put_str(g, "w\n");
  put<uint32_t>(g, 1);      // dims
  put<uint64_t>(g, 1024);   // ne[0]
  put<uint32_t>(g, 0);      // F32
  put<uint64_t>(g, 0);      // offset
  g.resize(64, '\0');       // to the 32-byte boundary where the (empty) data section starts
  m = error_of([&] { GgufFile::from_bytes(g, "y.gguf"); });
  EXPECT_TRUE(one_line(m)) << m;
  EXPECT_NE(m.find(R"(y.gguf: tensor "w\x0a")"), std::string::npos) << m;
}

// ---- safetensors and the index ----------------------------------------------------------------------------

TEST(FuzzRegressions, SafetensorsFromBytesMatchesTheFile) {
  ScratchDir dir("fuzz_st");
  const std::string good = test::safetensors_bytes(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}})",
      std::string(16, '\x01'));
  test::write_bytes(dir / "g.safetensors", good);
  SafeTensorsReader file(dir / "g.safetensors");
  SafeTensorsReader mem = SafeTensorsReader::from_bytes(good, "mem.safetensors");
  ASSERT_EQ(mem.entries().size(), file.entries().size());
  for (size_t i = 0; i < mem.entries().size(); i++) {
    EXPECT_EQ(mem.entries()[i].name, file.entries()[i].name);
    EXPECT_EQ(mem.entries()[i].begin, file.entries()[i].begin);
    EXPECT_EQ(mem.entries()[i].end, file.entries()[i].end);
    EXPECT_EQ(std::memcmp(mem.entries()[i].bytes, file.entries()[i].bytes, mem.entries()[i].end - mem.entries()[i].begin), 0);
  }
  EXPECT_EQ(mem.path(), "mem.safetensors");
  EXPECT_EQ(mem.get("a").f32()[0], file.get("a").f32()[0]);
  // A moved reader keeps its pointers (the bytes live on the heap, not in a small string).
  SafeTensorsReader moved = std::move(mem);
  EXPECT_EQ(moved.get("a").f32()[1], file.get("a").f32()[1]);

  const std::string bad = test::safetensors_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678");
  test::write_bytes(dir / "b.safetensors", bad);
  const std::string from_file = error_of([&] { SafeTensorsReader r(dir / "b.safetensors"); });
  const std::string from_bytes = error_of([&] { SafeTensorsReader::from_bytes(bad, dir / "b.safetensors"); });
  EXPECT_EQ(from_file, from_bytes);
}

TEST(FuzzRegressions, IndexShardNamesAreFilesBesideTheIndex) {
  auto shards = parse_safetensors_index(
      R"({"metadata": {"total_size": 8}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}})",
      "i.json");
  ASSERT_EQ(shards.size(), 2u);
  EXPECT_EQ(shards[0].file, "s1.safetensors");
  EXPECT_EQ(shards[0].first_tensor, "a");
  EXPECT_EQ(shards[1].file, "s2.safetensors");
  // A NUL inside the name would open the file before it (the C path stops there).
  std::string m = error_of([] {
    parse_safetensors_index(R"({"weight_map": {"a": "model.safetensors\u0000.json"}})", "i.json");
  });
  EXPECT_NE(m.find("i.json"), std::string::npos) << m;
  EXPECT_TRUE(one_line(m)) << m;
  m = error_of([] { parse_safetensors_index(R"({"weight_map": {"a\nb": "../x"}})", "i.json"); });
  EXPECT_TRUE(one_line(m)) << m;
  EXPECT_NE(m.find("not a file in the directory"), std::string::npos) << m;
}

}  // namespace
}  // namespace kiln
