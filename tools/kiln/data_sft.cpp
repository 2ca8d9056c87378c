// kiln data prepare-sft: chat/instruction JSONL -> token shards with loss masks (train/sft.h).
// Extends the `data` subcommand that tools/kiln/data.cpp creates (order 1 runs after it).
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tools/kiln/command.h"
#include "train/sft.h"

namespace {

kiln::cli::Command data_sft_cmd(
    "data prepare-sft",
    [](CLI::App& root) {
      CLI::App* data = root.get_subcommand("data");
      auto opt = std::make_shared<kiln::SftPrepareOptions>();
      auto* c = data->add_subcommand(
          "prepare-sft",
          "Tokenize supervised examples (JSONL: {\"prompt\", \"response\"} or {\"messages\": [{\"role\": "
          "system|user|assistant, \"content\"}...]}) into train_NNNNNN.bin / val_NNNNNN.bin shards with .idx and "
          ".mask files; loss only on assistant tokens. Template: each message is \"<|ROLE|>\\n\" + content, then "
          "\"\\n\" (system, user) or end-of-text (assistant); markers are plain text. Messages after the last "
          "assistant turn are dropped. Train with --packing or --batching padded");
      c->add_option("--tokenizer", opt->tokenizer, "Tokenizer directory or tokenizer.json")->required();
      c->add_option("--input", opt->inputs, "JSONL files or globs, one example per line")->required();
      c->add_option("--out", opt->out, "Output directory (must not hold shards yet)")->required();
      c->add_option("--val-fraction", opt->val_fraction, "Fraction of examples for the validation split")
          ->capture_default_str();
      c->add_option("--shard-tokens", opt->shard_tokens, "Tokens per shard")->capture_default_str();
      c->add_option("--seed", opt->seed, "Seed of the per-example validation choice")->capture_default_str();
      c->callback([opt] {
        const auto t0 = std::chrono::steady_clock::now();
        const kiln::SftPrepareStats st = kiln::prepare_sft(*opt);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        nlohmann::json j = {{"out", opt->out},
                            {"examples", st.examples},
                            {"train_examples", st.train_examples},
                            {"val_examples", st.val_examples},
                            {"train_tokens", st.train_tokens},
                            {"val_tokens", st.val_tokens},
                            {"trained_tokens", st.trained_tokens},
                            {"shards", st.shards.size()},
                            {"seconds", secs}};
        std::printf("%s\n", j.dump().c_str());
      });
    },
    /*order=*/1);

}  // namespace
