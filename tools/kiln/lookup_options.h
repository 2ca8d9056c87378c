// The prompt-lookup flags that kiln generate and kiln serve share (infer/prompt_lookup.h); --draft-tokens, which
// every drafting method reads, stays with each command.
#pragma once
#include <CLI/CLI.hpp>

#include "infer/prompt_lookup.h"

namespace kiln::cli {

inline void add_prompt_lookup_options(CLI::App* c, bool& on, PromptLookupParams& p) {
  c->add_flag("--prompt-lookup", on,
              "Speculative decoding without a draft model: each round proposes the --draft-tokens tokens that followed "
              "the latest earlier occurrence of the sequence's last n tokens (n-gram drafting)");
  c->add_option("--lookup-max-ngram", p.max_ngram, "--prompt-lookup: the longest suffix matched")->capture_default_str();
  c->add_option("--lookup-min-ngram", p.min_ngram,
                "--prompt-lookup: the shortest suffix matched (none that long: a plain step)")
      ->capture_default_str();
  c->add_flag_callback("--lookup-fixed-length", [&p] { p.adaptive = false; },
              "--prompt-lookup: always propose --draft-tokens (default: the length doubles after a round that all "
              "passed and halves, to no less than the accepted count + 1, after a rejection)");
}

}  // namespace kiln::cli
