// kiln data prepare: text or JSONL files -> llm.c token shards with document indexes (train/prepare.h).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tools/kiln/command.h"
#include "train/prepare.h"

namespace {

kiln::cli::Command data_cmd("data", [](CLI::App& root) {
  auto* data = root.add_subcommand("data", "Prepare training data");
  data->require_subcommand(1);
  auto opt = std::make_shared<kiln::PrepareOptions>();
  auto* prep = data->add_subcommand(
      "prepare",
      "Tokenize text files (one document each) or .jsonl files (one document per line's \"text\") into "
      "train_NNNNNN.bin / val_NNNNNN.bin shards, with end-of-text after each document");
  prep->add_option("--tokenizer", opt->tokenizer, "Tokenizer directory or tokenizer.json")->required();
  prep->add_option("--input", opt->inputs, "Input files or globs (.txt: one document; .jsonl: one per line)")
      ->required();
  prep->add_option("--out", opt->out, "Output directory (must not hold shards yet)")->required();
  prep->add_option("--val-fraction", opt->val_fraction, "Fraction of documents for the validation split")
      ->capture_default_str();
  prep->add_option("--shard-tokens", opt->shard_tokens, "Tokens per shard")->capture_default_str();
  prep->add_option("--doc-separator", opt->doc_separator,
                   "Plain text: a line equal to this separates documents (e.g. % in fortune files)");
  prep->add_option("--seed", opt->seed, "Seed of the per-document validation choice")->capture_default_str();
  prep->callback([opt] {
    auto t0 = std::chrono::steady_clock::now();
    if (::isatty(2)) {
      opt->progress = [t0](uint64_t done, uint64_t total) {
        double frac = total ? double(done) / double(total) : 1.0;
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        int filled = int(frac * 40 + 0.5);
        std::fprintf(stderr, "\rprepare [%.*s%*s] %5.1f%% %.1f MB/s", filled,
                     "########################################", 40 - filled, "", 100.0 * frac,
                     secs > 0 ? double(done) / 1e6 / secs : 0.0);
        std::fflush(stderr);
      };
    }
    kiln::PrepareStats st = kiln::prepare_data(*opt);
    if (::isatty(2)) std::fprintf(stderr, "\n");
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nlohmann::json j = {{"out", opt->out},
                        {"documents", st.documents},
                        {"train_documents", st.train_documents},
                        {"val_documents", st.val_documents},
                        {"train_tokens", st.train_tokens},
                        {"val_tokens", st.val_tokens},
                        {"train_shards", st.train_shards},
                        {"val_shards", st.val_shards},
                        {"seconds", secs}};
    std::printf("%s\n", j.dump().c_str());
  });
});

}  // namespace
