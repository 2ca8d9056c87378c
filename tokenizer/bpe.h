// Byte-level BPE, exactly as GPT-2 encodes: special tokens are split out first, the rest is
// pre-tokenized (tokenizer/pretokenize.h), and each pre-token's bytes are merged by rank. Within a
// pre-token the merge loop is GPT-2's: take the adjacent pair of lowest rank and merge every
// occurrence of it left to right, until no adjacent pair has a rank.
//
// Files: GPT-2's encoder.json + vocab.bpe (a directory holding them), or a Hugging Face tokenizer.json
// of a byte-level BPE model. Tokens are kept as raw bytes; the files spell them in GPT-2's
// byte-to-unicode alphabet (bytes_to_unicode).
//
// Special tokens: <|endoftext|> of encoder.json, and every added_tokens entry of a tokenizer.json. With
// allow_special they are found in the text first (leftmost, then longest); without, they are plain text.
// Any byte string encodes (invalid UTF-8 included, see pretokenize.h) and decode(encode(x)) == x.
// Speed: merge ranks in an open-addressing table keyed by the id pair, a per-thread cache from pre-token
// to ids, and large inputs cut at safe split points and encoded on OpenMP threads with the same result.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/hash.h"

namespace kiln {

namespace bytelevel {
// The code point GPT-2 prints for byte b ('!'..'~', '¡'..'¬', '®'..'ÿ' as themselves, others from U+0100).
uint32_t byte_to_codepoint(uint8_t b);
// GPT-2's vocabulary lists the 256 single bytes first, in this order (printable ones first).
const std::vector<uint8_t>& gpt2_byte_order();
// Raw bytes -> their byte-level spelling (UTF-8).
std::string to_unicode(std::string_view bytes);
// Byte-level spelling -> raw bytes; nullopt if some character is not in the byte alphabet.
std::optional<std::string> from_unicode(std::string_view text);
}  // namespace bytelevel

struct SpecialToken {
  std::string content;
  uint32_t id;
};

class Tokenizer {
 public:
  Tokenizer() = default;

  // A directory with encoder.json + vocab.bpe (or tokenizer.json), or a tokenizer.json file.
  // Throws kiln::Error naming the file and the problem.
  static Tokenizer load(const std::string& dir_or_file);
  static Tokenizer load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe);
  static Tokenizer load_hf_json(const std::string& tokenizer_json);

  // tokens[id]: the raw bytes of each token; merges: (left id, right id) in rank order, each of which
  // must concatenate to a token in `tokens`; specials: matched in the text before pre-tokenization.
  // raw[id] (optional): token is not byte-level (special tokens, or vocab entries outside the byte
  // alphabet) and is saved verbatim. `source` names the file in errors.
  static Tokenizer from_parts(std::vector<std::string> tokens, const std::vector<std::pair<uint32_t, uint32_t>>& merges,
                              std::vector<SpecialToken> specials, std::vector<bool> raw = {},
                              const std::string& source = "tokenizer", bool ignore_merges = false);

  // threads: 0 = all OpenMP threads for inputs of 1 MB or more, 1 = single-threaded, N = N threads.
  // The result does not depend on the number of threads.
  std::vector<uint32_t> encode(std::string_view text, bool allow_special = true, int threads = 0) const;
  // Appends to out (single-threaded); for many small documents.
  void encode_append(std::string_view text, std::vector<uint32_t>& out, bool allow_special = true) const;

  // Throws kiln::Error on an id outside the vocabulary.
  std::string decode(const uint32_t* ids, size_t n) const;
  std::string decode(const std::vector<uint32_t>& ids) const { return decode(ids.data(), ids.size()); }
  std::string decode_token(uint32_t id) const;

  int vocab_size() const { return int(tokens_.size()); }
  size_t num_merges() const { return merges_.size(); }
  const std::vector<std::pair<uint32_t, uint32_t>>& merges() const { return merges_; }
  const std::vector<SpecialToken>& specials() const { return specials_; }
  // <|endoftext|> (or <|end_of_text|>, </s>) if the vocabulary has it.
  std::optional<uint32_t> eot_id() const { return eot_; }
  // The id of a token given its raw bytes (byte-level tokens and specials).
  std::optional<uint32_t> token_id(std::string_view bytes) const;

  // Writes encoder.json, vocab.bpe and tokenizer.json into dir (created if needed), each atomically.
  void save(const std::string& dir) const;
  std::string to_encoder_json() const;
  std::string to_vocab_bpe() const;
  std::string to_hf_json() const;

 private:
  void encode_ordinary(std::string_view text, std::vector<uint32_t>& out) const;
  void encode_word(std::string_view word, std::vector<uint32_t>& out) const;
  void bpe_short(std::string_view word, std::vector<uint32_t>& out) const;
  void bpe_long(std::string_view word, std::vector<uint32_t>& out) const;
  // Pieces of text between special tokens: calls ordinary(begin, end) and special(id) in order.
  template <class Ordinary, class Special>
  void split_specials(std::string_view text, bool allow_special, Ordinary&& ordinary, Special&& special) const;

  std::vector<std::string> tokens_;  // id -> raw bytes
  std::vector<bool> raw_;            // id -> spelled verbatim in files (not byte-level)
  std::vector<std::pair<uint32_t, uint32_t>> merges_;
  std::vector<SpecialToken> specials_;
  std::unordered_map<std::string, uint32_t> token_to_id_;  // raw bytes -> id (byte-level tokens)
  uint32_t byte_id_[256] = {};
  bpe_detail::PairMap ranks_;
  std::optional<uint32_t> eot_;
  bool ignore_merges_ = false;
  uint64_t serial_ = 0;  // identifies this vocabulary to the per-thread word caches
};

}  // namespace kiln
