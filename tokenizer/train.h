// Byte-level BPE training, GPT-2 style: the corpus is pre-tokenized (GPT-2's rule, or Llama 3's / Qwen2's), pre-tokens are
// counted, and the most frequent adjacent pair is merged repeatedly (incremental pair counts with a
// lazily updated priority queue). Ids: the 256 bytes first in GPT-2's byte order, then one id per merge,
// then the special tokens (<|endoftext|> by default) last.
// Ties between equally frequent pairs go to the pair whose (left bytes, right bytes) sorts first, so the
// result depends only on the corpus, not on threads or hash order.
#pragma once
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/bpe.h"

namespace kiln {

struct BpeTrainOptions {
  // Including the 256 bytes and the special tokens.
  int vocab_size = 0;
  std::vector<std::string> special_tokens = {"<|endoftext|>"};
  // Stop when the best pair occurs fewer times than this.
  int64_t min_pair_count = 2;
  // Threads for counting pre-tokens; 0 = all.
  int threads = 0;
  // The pre-tokenization rule; the trained tokenizer keeps it (and its tokenizer.json says it).
  PreTokenizer pre_tokenizer = PreTokenizer::kGpt2;
  // Called now and then.
  std::function<void(int merges_done, int merges_wanted)> progress;
};

// Trains on the concatenated text of each file (special-token strings in it are not learned across).
// Throws kiln::Error naming a file that cannot be read, or if no file has any text.
Tokenizer train_bpe(const std::vector<std::string>& files, const BpeTrainOptions& options);
Tokenizer train_bpe_texts(const std::vector<std::string_view>& texts, const BpeTrainOptions& options);

// Pre-token -> count over a text, ignoring special-token strings (exposed for tests).
std::vector<std::pair<std::string, int64_t>> count_pretokens(const std::vector<std::string_view>& texts,
                                                             const std::vector<std::string>& specials, int threads,
                                                             PreTokenizer pre = PreTokenizer::kGpt2);

}  // namespace kiln
