// Supervised fine-tuning data: chat examples -> token shards whose loss covers only the responses.
//
// Input (JSONL, one example a line; blank lines are skipped):
//   {"prompt": "...", "response": "..."}
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
// Template (markers are plain text, tokenized as ordinary text; EOT is the tokenizer's end-of-text id):
//   each message renders as  "<|ROLE|>\n" + content, followed by "\n" for system and user messages and by
//   EOT for assistant messages. A prompt/response pair is the conversation [user: prompt, assistant:
//   response], i.e. "<|user|>\nPROMPT\n<|assistant|>\nRESPONSE" EOT. Messages after the last assistant
//   turn are dropped (nothing would learn from them), so every example ends with EOT.
// The untrained text before each assistant content (markers, system and user messages) is tokenized as
// one string and each assistant content on its own, so the boundary between prompt and response is a
// token boundary. All lines are checked before anything is written.
// Loss mask: 1 for the tokens of assistant contents and the EOT after each (the model learns to answer
// and to stop), 0 for markers, system and user text. The sources in train/packing.h set target -1
// wherever the predicted token has mask 0.
//
// Output: <out>/train_NNNNNN.bin and val_NNNNNN.bin shards (llm.c format, train/shards.h), each with
// <shard>.idx (train/doc_index.h, one document per example) and <shard>.mask:
//   header: uint32 magic "KMSK" (0x4B534D4B little-endian), uint32 version 1, int64 token count
//   body:   count bytes, one per token of the shard: 1 = a response token whose prediction is trained.
// An example goes to the validation split with probability val_fraction, decided from (seed, example
// number) as in `kiln data prepare`.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/file_io.h"

namespace kiln {

class Tokenizer;

constexpr uint32_t kLossMaskMagic = 0x4B534D4Bu;  // "KMSK"
constexpr uint32_t kLossMaskVersion = 1;

// Writes <path> atomically. Throws if a byte is not 0 or 1.
void write_loss_mask(const std::string& path, const std::vector<uint8_t>& mask);

// A memory-mapped .mask file, validated (magic, version, count == shard_tokens, bytes 0/1).
class LossMask {
 public:
  LossMask(const std::string& path, int64_t shard_tokens);
  uint8_t operator[](int64_t i) const { return body_[i]; }
  int64_t size() const { return count_; }

 private:
  MappedFile file_;
  const uint8_t* body_ = nullptr;
  int64_t count_ = 0;
};

struct SftExample {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;  // per token, as in the .mask body
};

// Renders one parsed JSONL line. `where` ("file:line") prefixes every error: a missing or mistyped
// field, an unknown role, an empty response (or assistant content), no assistant turn.
SftExample render_sft_example(const nlohmann::json& line, const Tokenizer& tok, const std::string& where);

struct SftPrepareOptions {
  std::string tokenizer;  // directory or tokenizer.json
  std::vector<std::string> inputs;  // JSONL files or globs
  std::string out;
  double val_fraction = 0.0;
  uint64_t seed = 1337;
  int64_t shard_tokens = 100'000'000;
};

struct SftPrepareStats {
  int64_t examples = 0, train_examples = 0, val_examples = 0;
  int64_t train_tokens = 0, val_tokens = 0, trained_tokens = 0;  // trained: mask 1 (both splits)
  std::vector<std::string> shards;
};

// Throws kiln::Error naming file:line for a malformed line, and the file for a missing input, an input
// without examples, or an output directory that already holds shards.
SftPrepareStats prepare_sft(const SftPrepareOptions& options);

}  // namespace kiln
