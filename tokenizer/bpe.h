// Byte-level BPE, exactly as GPT-2 encodes: special tokens are split out first, the rest is
// pre-tokenized (tokenizer/pretokenize.h), and each pre-token's bytes are merged by rank. Within a
// pre-token the merge loop is GPT-2's: take the adjacent pair of lowest rank and merge every
// occurrence of it left to right, until no adjacent pair has a rank.
//
// Files: GPT-2's encoder.json + vocab.bpe (a directory holding them), or a Hugging Face tokenizer.json
// of a byte-level BPE model. Tokens are kept as raw bytes; the files spell them in GPT-2's
// byte-to-unicode alphabet (bytes_to_unicode).
//
// Pre-tokenization: GPT-2's, Llama 3's or Qwen2's rule (pretokenize.h), from tokenizer.json's pre_tokenizer.
//
// Added tokens: <|endoftext|> of encoder.json, and every added_tokens entry of a tokenizer.json. They are
// found in the text before pre-tokenization, as Hugging Face does: first those with normalized=false
// (leftmost, then longest), then those with normalized=true in the text between (the same with no
// normalizer, except for which wins an overlap). lstrip / rstrip take the Unicode whitespace before /
// after a match into it. Without allow_special, tokens with special=true are plain text (non-special
// added tokens are always matched, as llama.cpp does with user-defined tokens).
//
// Post-processing (bos/eos around a text, from tokenizer.json's post_processor or tokenizer_config.json)
// is not applied by encode(): prefix_ids() / suffix_ids() say what to add.
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
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer_config.h"

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

// An added token (tokenizer.json's added_tokens; the flags are Hugging Face's AddedToken's).
struct SpecialToken {
  std::string content;
  uint32_t id;
  bool special = true;  // false: a user-defined token, matched even without allow_special
  bool lstrip = false, rstrip = false, normalized = false;
};

// GGUF's token types (tokenizer.ggml.token_type), by their GGUF values.
enum class TokenType : int32_t { kNormal = 1, kControl = 3, kUserDefined = 4 };

// GGUF's tokenizer.ggml.pre name of a pre-tokenizer: "gpt-2", "llama-bpe", "qwen2".
const char* gguf_pre_name(PreTokenizer pre);

class Tokenizer {
 public:
  Tokenizer() = default;

  // A directory with tokenizer.json (or else encoder.json + vocab.bpe), or a tokenizer.json file; a
  // tokenizer_config.json beside tokenizer.json is loaded with it. Throws kiln::Error naming the file and
  // the problem.
  static Tokenizer load(const std::string& dir_or_file);
  // Whether dir is a folder holding what load() reads from one: tokenizer.json, or encoder.json + vocab.bpe.
  static bool in_dir(const std::string& dir);
  static Tokenizer load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe);
  static Tokenizer load_hf_json(const std::string& tokenizer_json);
  // A tokenizer.json's text (what load_hf_json reads); `source` names the file in errors (tests, the fuzzer).
  static Tokenizer parse_hf_json(const std::string& text, const std::string& source);

  // tokens[id]: the raw bytes of each token; merges: (left id, right id) in rank order, each of which
  // must concatenate to a token in `tokens`; specials: matched in the text before pre-tokenization.
  // raw[id] (optional): token is not byte-level (special tokens, or vocab entries outside the byte
  // alphabet) and is saved verbatim. `source` names the file in errors.
  static Tokenizer from_parts(std::vector<std::string> tokens, const std::vector<std::pair<uint32_t, uint32_t>>& merges,
                              std::vector<SpecialToken> specials, std::vector<bool> raw = {},
                              const std::string& source = "tokenizer", bool ignore_merges = false,
                              PreTokenizer pre = PreTokenizer::kGpt2);

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
  // The added tokens (special or not), longest first.
  const std::vector<SpecialToken>& specials() const { return specials_; }
  // tokenizer_config.json's eos_token when there is one, else <|endoftext|> (or <|end_of_text|>, </s>)
  // if the vocabulary has it.
  std::optional<uint32_t> eot_id() const { return eot_; }
  // tokenizer_config.json's bos_token, else the first token the post_processor puts before a text.
  std::optional<uint32_t> bos_id() const { return bos_; }

  PreTokenizer pre_tokenizer() const { return pre_; }
  bool normalizes_nfc() const { return nfc_; }
  // Normal, control (special added tokens) or user-defined (non-special added tokens).
  TokenType token_type(uint32_t id) const;
  // token_type of every id, in id order (for GGUF's tokenizer.ggml.token_type).
  std::vector<TokenType> token_types() const;
  // Ids to put before / after a text's ids for the model (not done by encode()): tokenizer_config.json's
  // add_bos_token / add_eos_token when given, else what tokenizer.json's post_processor adds.
  const std::vector<uint32_t>& prefix_ids() const { return prefix_; }
  const std::vector<uint32_t>& suffix_ids() const { return suffix_; }
  // tokenizer_config.json, if loaded with one.
  const std::optional<TokenizerConfig>& config() const { return config_; }
  // Attaches a tokenizer_config.json (bos/eos tokens must be in the vocabulary; source names it in errors).
  void set_config(TokenizerConfig config, const std::string& source);
  // How files spell token id: GPT-2's byte-to-unicode form, or verbatim for added tokens and vocabulary
  // entries outside the byte alphabet (tokenizer.json's vocab, GGUF's tokenizer.ggml.tokens).
  std::string spelling(uint32_t id) const;
  // The id of a token given its raw bytes (byte-level tokens and specials).
  std::optional<uint32_t> token_id(std::string_view bytes) const;

  // Writes tokenizer.json into dir (created if needed), with encoder.json + vocab.bpe for GPT-2's
  // pre-tokenizer (they cannot say another) and tokenizer_config.json when loaded with one; each atomically.
  void save(const std::string& dir) const;
  std::string to_encoder_json() const;
  std::string to_vocab_bpe() const;
  std::string to_hf_json() const;

 private:
  void encode_text(std::string_view text, std::vector<uint32_t>& out) const;
  void encode_text_normalized(std::string_view text, std::vector<uint32_t>& out) const;
  void encode_ordinary(std::string_view text, std::vector<uint32_t>& out) const;
  void encode_ordinary_split(std::string_view text, std::vector<uint32_t>& out) const;
  void encode_word(std::string_view word, std::vector<uint32_t>& out) const;
  void bpe_short(std::string_view word, std::vector<uint32_t>& out) const;
  void bpe_long(std::string_view word, std::vector<uint32_t>& out) const;
  // Pieces of text between special tokens: calls ordinary(begin, end) and special(id) in order.
  template <class Ordinary, class Special>
  void split_specials(std::string_view text, bool allow_special, Ordinary&& ordinary, Special&& special) const;
  template <class Ordinary, class Special>
  void split_group(std::string_view text, size_t begin, size_t end, const std::vector<uint32_t>& group,
                   bool allow_special, Ordinary&& ordinary, Special&& special) const;
  friend struct HfJsonLoader;

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
  // Below: not read per word.
  std::vector<uint32_t> unnormalized_, normalized_;  // indices into specials_ of the two matching passes
  std::optional<uint32_t> bos_;
  PreTokenizer pre_ = PreTokenizer::kGpt2;
  bool nfc_ = false;  // tokenizer.json's normalizer is NFC (Qwen2): applied to the text between added tokens
  std::vector<uint32_t> prefix_, suffix_;            // what is added around a text (see prefix_ids())
  std::vector<uint32_t> post_prefix_, post_suffix_;  // what tokenizer.json's post_processor adds
  std::string post_processor_json_;                  // as loaded, written back by to_hf_json()
  std::optional<TokenizerConfig> config_;
};

}  // namespace kiln
