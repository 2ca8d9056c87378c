// `kiln data prepare`: text files -> llm.c token shards with document indexes.
// Inputs: plain text files (one document each) and .jsonl files (one document per line's "text" field).
// Each document is encoded as ordinary text (special-token strings in it are not special) and followed by
// the end-of-text token. Each document goes to the validation split with probability val_fraction, decided
// from (seed, document number) alone. Shards: <out>/train_000000.bin, <out>/val_000000.bin, ... of
// shard_tokens tokens (the last one shorter), each with <shard>.idx (train/doc_index.h); a document that
// does not fit continues in the next shard.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kiln {

struct PrepareOptions {
  std::string tokenizer;            // directory or tokenizer.json
  std::vector<std::string> inputs;  // files or glob patterns
  std::string out;
  double val_fraction = 0.0;
  int64_t shard_tokens = 100'000'000;
  uint64_t seed = 1337;
  // Plain text only: a line exactly equal to this (e.g. "%" in fortune files) separates documents;
  // empty: each file is one document. Blank-only documents are dropped.
  std::string doc_separator;
  int64_t stream_bytes = int64_t(32) << 20;  // plain text files larger than this are encoded piece by piece
  std::function<void(uint64_t bytes_done, uint64_t bytes_total)> progress;
};

struct PrepareStats {
  int64_t documents = 0, train_documents = 0, val_documents = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  int train_shards = 0, val_shards = 0;
  std::vector<std::string> shards;  // paths written, in order
};

// Throws kiln::Error (one line, naming the file and line) on a missing tokenizer or input, an empty input
// ("no text found in ..."), malformed JSONL, or an output directory that already holds shards.
PrepareStats prepare_data(const PrepareOptions& options);

// True if document `index` goes to the validation split.
// Shared by `data prepare` and `data prepare-sft`: checks the split/shard options and expands the input
// patterns into existing regular files (throws naming the first problem).
std::vector<std::string> check_and_expand_inputs(const std::vector<std::string>& patterns, const std::string& out,
                                                 double val_fraction, int64_t shard_tokens);

bool is_val_document(uint64_t seed, uint64_t index, double val_fraction);

}  // namespace kiln
