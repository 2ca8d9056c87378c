// kiln tokenizer train|encode|decode|bench: byte-level BPE (GPT-2 compatible), see tokenizer/bpe.h.
#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/train.h"
#include "tools/kiln/command.h"

namespace {

using kiln::Tokenizer;

// A one-line bar on stderr, only when stderr is a terminal.
void show_progress(const char* what, double frac) {
  static const bool tty = ::isatty(2);
  if (!tty) return;
  int filled = int(frac * 40 + 0.5);
  std::fprintf(stderr, "\r%s [%.*s%*s] %5.1f%%", what, filled, "########################################", 40 - filled,
               "", 100.0 * frac);
  if (frac >= 1.0) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::vector<std::string> expand_all(const std::vector<std::string>& patterns) {
  std::vector<std::string> files;
  for (const auto& p : patterns)
    for (auto& f : kiln::expand_glob(p)) files.push_back(f);
  return files;
}

std::string read_input(const std::string& path) {
  KILN_CHECK(kiln::file_exists(path), path, ": no such file");
  return kiln::read_file(path);
}

void write_stdout(const std::string& s) {
  KILN_CHECK(std::fwrite(s.data(), 1, s.size(), stdout) == s.size(), "writing to stdout failed");
}

// Ids from a file: whitespace/comma separated numbers, a JSON array, or {"tokens": [...]}.
std::vector<uint32_t> parse_ids(const std::string& text, const std::string& path) {
  std::vector<uint32_t> ids;
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (text[first] == '[' || text[first] == '{')) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      kiln::fail(path, ": malformed JSON (", e.what(), ")");
    }
    if (j.is_object()) {
      KILN_CHECK(j.contains("tokens"), path, ": expected {\"tokens\": [...]}");
      j = j["tokens"];
    }
    KILN_CHECK(j.is_array(), path, ": expected an array of token ids");
    for (size_t i = 0; i < j.size(); i++) {
      KILN_CHECK(j[i].is_number_unsigned(), path, ": element ", i, " is not a token id");
      ids.push_back(j[i].get<uint32_t>());
    }
    return ids;
  }
  size_t pos = 0;
  while (pos < text.size()) {
    pos = text.find_first_not_of(" \t\r\n,", pos);
    if (pos == std::string::npos) break;
    size_t end = text.find_first_of(" \t\r\n,", pos);
    if (end == std::string::npos) end = text.size();
    std::string word = text.substr(pos, end - pos);
    KILN_CHECK(word.find_first_not_of("0123456789") == std::string::npos && word.size() <= 10, path, ": '", word,
               "' is not a token id");
    unsigned long long v = std::stoull(word);
    KILN_CHECK(v <= 0xffffffffull, path, ": token id ", word, " is too large");
    ids.push_back(uint32_t(v));
    pos = end;
  }
  return ids;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

kiln::cli::Command tokenizer_cmd("tokenizer", [](CLI::App& root) {
  auto* tok =
      root.add_subcommand("tokenizer", "Byte-level BPE tokenizers (GPT-2 compatible): train, encode, decode, bench");
  tok->require_subcommand(1);

  // ---- train
  struct TrainArgs {
    std::vector<std::string> inputs;
    int vocab_size = 0;
    std::string out;
    std::vector<std::string> specials = {"<|endoftext|>"};
    int64_t min_pair_count = 2;
    int threads = 0;
    std::string pre = "gpt2";
  };
  auto ta = std::make_shared<TrainArgs>();
  auto* train =
      tok->add_subcommand("train", "Learn BPE merges from text files; writes tokenizer.json (and encoder.json + vocab.bpe for gpt2)");
  train->add_option("--input", ta->inputs, "Text files or globs")->required();
  train->add_option("--vocab-size", ta->vocab_size, "Vocabulary size: 256 bytes + merges + special tokens")->required();
  train->add_option("--out", ta->out, "Output directory")->required();
  train->add_option("--special-tokens", ta->specials, "Special tokens, given the last ids")->capture_default_str();
  train->add_option("--min-pair-count", ta->min_pair_count, "Stop when the best pair occurs fewer times")
      ->capture_default_str();
  train->add_option("--threads", ta->threads, "Threads for counting pre-tokens (0: all)")->capture_default_str();
  train->add_option("--pre-tokenizer", ta->pre, "Pre-tokenization rule: gpt2, llama3 or qwen2")
      ->check(CLI::IsMember({"gpt2", "llama3", "qwen2"}))
      ->capture_default_str();
  train->callback([ta] {
    kiln::BpeTrainOptions opt;
    opt.pre_tokenizer = kiln::pre_tokenizer_named(ta->pre);
    opt.vocab_size = ta->vocab_size;
    opt.special_tokens = ta->specials;
    opt.min_pair_count = ta->min_pair_count;
    opt.threads = ta->threads;
    opt.progress = [](int done, int wanted) { show_progress("merges", wanted ? double(done) / wanted : 1.0); };
    auto t0 = std::chrono::steady_clock::now();
    Tokenizer t = kiln::train_bpe(expand_all(ta->inputs), opt);
    double secs = seconds_since(t0);
    t.save(ta->out);
    nlohmann::json j = {
        {"out", ta->out}, {"vocab_size", t.vocab_size()}, {"merges", t.num_merges()}, {"seconds", secs},
        {"pre_tokenizer", kiln::gguf_pre_name(t.pre_tokenizer())}};
    if (t.vocab_size() < ta->vocab_size)
      std::fprintf(stderr, "kiln: the corpus ran out of pairs occurring %lld+ times: vocabulary is %d, not %d\n",
                   (long long)ta->min_pair_count, t.vocab_size(), ta->vocab_size);
    std::printf("%s\n", j.dump().c_str());
  });

  // ---- encode
  struct EncodeArgs {
    std::string tokenizer, input;
    bool json = false, ordinary = false;
  };
  auto ea = std::make_shared<EncodeArgs>();
  auto* enc = tok->add_subcommand("encode", "Print the token ids of a text file");
  enc->add_option("--tokenizer", ea->tokenizer, "Tokenizer directory or tokenizer.json")->required();
  enc->add_option("--input", ea->input, "Text file")->required();
  enc->add_flag("--json", ea->json, "Print {\"tokens\": [...]} instead of space-separated ids");
  enc->add_flag("--ordinary", ea->ordinary, "Treat special-token strings such as <|endoftext|> as plain text");
  enc->callback([ea] {
    Tokenizer t = Tokenizer::load(ea->tokenizer);
    auto ids = t.encode(read_input(ea->input), !ea->ordinary);
    if (ea->json) {
      write_stdout(nlohmann::json{{"tokens", ids}}.dump() + "\n");
      return;
    }
    std::string s;
    for (size_t i = 0; i < ids.size(); i++) {
      if (i) s += ' ';
      s += std::to_string(ids[i]);
    }
    write_stdout(s + "\n");
  });

  // ---- decode
  struct DecodeArgs {
    std::string tokenizer, input;
  };
  auto da = std::make_shared<DecodeArgs>();
  auto* dec =
      tok->add_subcommand("decode", "Print the text of token ids (space-separated, or JSON as encode --json writes)");
  dec->add_option("--tokenizer", da->tokenizer, "Tokenizer directory or tokenizer.json")->required();
  dec->add_option("--input", da->input, "File of token ids")->required();
  dec->callback([da] {
    Tokenizer t = Tokenizer::load(da->tokenizer);
    auto ids = parse_ids(read_input(da->input), da->input);
    write_stdout(t.decode(ids));
  });

  // ---- bench
  struct BenchArgs {
    std::string tokenizer, input, peer_script;
    int threads = 0, repeat = 3;
  };
  auto ba = std::make_shared<BenchArgs>();
  auto* bench = tok->add_subcommand("bench", "Encoding speed, single-threaded and threaded (one JSON line)");
  bench->add_option("--tokenizer", ba->tokenizer, "Tokenizer directory or tokenizer.json")->required();
  bench->add_option("--input", ba->input, "Text file")->required();
  bench->add_option("--threads", ba->threads, "Threads for the threaded run (0: all)")->capture_default_str();
  bench->add_option("--repeat", ba->repeat, "Runs of each; the best is reported")->capture_default_str();
  bench->add_option("--peer-script", ba->peer_script,
                    "A node script timing a peer encoder on the same file (tests/peer/gpt2_bench.js, GPT-2 only); "
                    "its MB/s and kiln's ratio to it are added");
  bench->callback([ba] {
    Tokenizer t = Tokenizer::load(ba->tokenizer);
    std::string text = read_input(ba->input);
    KILN_CHECK(!text.empty(), "no text found in ", ba->input);
    int threads = ba->threads > 0 ? ba->threads : omp_get_max_threads();
    // The first run of each also fills the per-thread word caches; best of `repeat`.
    double first = 0;
    auto best = [&](int n_threads, std::vector<uint32_t>& ids) {
      double b = 1e30;
      for (int r = 0; r < std::max(1, ba->repeat); r++) {
        auto t0 = std::chrono::steady_clock::now();
        ids = t.encode(text, true, n_threads);
        double s = seconds_since(t0);
        if (first == 0) first = s;
        b = std::min(b, s);
      }
      return b;
    };
    std::vector<uint32_t> single_ids, threaded_ids;
    double s1 = best(1, single_ids);
    double sn = best(threads, threaded_ids);
    double mb = double(text.size()) / 1e6;
    nlohmann::json j = {{"pre_tokenizer", kiln::gguf_pre_name(t.pre_tokenizer())},
                        {"bytes", text.size()},
                        {"tokens", single_ids.size()},
                        {"single_first_run_mb_s", mb / first},  // cold word cache
                        {"single_mb_s", mb / s1},
                        {"threads", threads},
                        {"threaded_mb_s", mb / sn},
                        {"threaded_over_single", s1 / sn},
                        {"identical", single_ids == threaded_ids},
                        {"decodes_back", t.decode(single_ids) == text}};
    if (!ba->peer_script.empty()) {
      // The peer prints one JSON line with "mb_s".
      std::string cmd = "node '" + ba->peer_script + "' '" + ba->input + "' " + std::to_string(ba->repeat);
      FILE* p = ::popen(cmd.c_str(), "r");
      KILN_CHECK(p, "cannot run ", cmd);
      std::string out;
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
      int rc = ::pclose(p);
      KILN_CHECK(rc == 0, ba->peer_script, ": the peer failed (exit status ", rc, ")");
      nlohmann::json peer;
      try {
        peer = nlohmann::json::parse(out);
      } catch (const nlohmann::json::exception&) {
        kiln::fail(ba->peer_script, ": expected one JSON line, got '", out.substr(0, 200), "'");
      }
      KILN_CHECK(peer.contains("mb_s") && peer["mb_s"].is_number(), ba->peer_script, ": no \"mb_s\" in its output");
      double peer_mb_s = peer["mb_s"].get<double>();
      j["peer"] = peer.value("peer", ba->peer_script);
      j["peer_mb_s"] = peer_mb_s;
      j["single_over_peer"] = mb / s1 / peer_mb_s;
    }
    std::printf("%s\n", j.dump().c_str());
  });
});

}  // namespace
