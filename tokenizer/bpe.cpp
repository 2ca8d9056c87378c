#include "tokenizer/bpe.h"
#include "tokenizer/normalize.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <queue>

#include "core/error.h"
#include "core/quote.h"
#include "tokenizer/pretokenize.h"

namespace kiln {

// ---- GPT-2's byte <-> unicode alphabet -------------------------------------------------------------

namespace bytelevel {

namespace {
bool printable(int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); }

struct Alphabet {
  uint32_t cp[256];
  std::vector<uint8_t> order;
  int16_t byte_of[324];  // code point -> byte, or -1 (all code points used are below 0x100 + 68)
  Alphabet() {
    std::fill(std::begin(byte_of), std::end(byte_of), int16_t(-1));
    int n = 0;
    for (int b = 0; b < 256; b++)
      if (printable(b)) order.push_back(uint8_t(b));
    for (int b = 0; b < 256; b++)
      if (!printable(b)) order.push_back(uint8_t(b));
    for (int b = 0; b < 256; b++) {
      cp[b] = printable(b) ? uint32_t(b) : uint32_t(256 + n++);
      byte_of[cp[b]] = int16_t(b);
    }
  }
};
const Alphabet& alphabet() {
  static const Alphabet a;
  return a;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}
}  // namespace

uint32_t byte_to_codepoint(uint8_t b) { return alphabet().cp[b]; }
const std::vector<uint8_t>& gpt2_byte_order() { return alphabet().order; }

std::string to_unicode(std::string_view bytes) {
  std::string s;
  s.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) append_utf8(s, alphabet().cp[b]);
  return s;
}

std::optional<std::string> from_unicode(std::string_view text) {
  const Alphabet& a = alphabet();
  std::string out;
  out.reserve(text.size());
  const uint8_t* p = reinterpret_cast<const uint8_t*>(text.data());
  const uint8_t* end = p + text.size();
  while (p < end) {
    uint32_t cp;
    if (p[0] < 0x80) {
      cp = p[0];
      p += 1;
    } else if ((p[0] & 0xE0) == 0xC0 && end - p >= 2 && (p[1] & 0xC0) == 0x80) {
      cp = (uint32_t(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
      p += 2;
    } else {
      return std::nullopt;  // the alphabet stays below U+0800
    }
    if (cp >= 324 || a.byte_of[cp] < 0) return std::nullopt;
    out += char(a.byte_of[cp]);
  }
  return out;
}

}  // namespace bytelevel

// ---- construction ----------------------------------------------------------------------------------

Tokenizer Tokenizer::from_parts(std::vector<std::string> tokens,
                                const std::vector<std::pair<uint32_t, uint32_t>>& merges,
                                std::vector<SpecialToken> specials, std::vector<bool> raw, const std::string& source,
                                bool ignore_merges, PreTokenizer pre) {
  static std::atomic<uint64_t> next_serial{1};
  Tokenizer t;
  const size_t n = tokens.size();
  KILN_CHECK(n >= 256 && n < (size_t(1) << 31), source, ": vocabulary of ", n, " tokens (need at least the 256 bytes)");
  if (raw.empty()) raw.assign(n, false);
  KILN_CHECK(raw.size() == n, source, ": internal: raw flags for ", raw.size(), " of ", n, " tokens");
  for (const SpecialToken& s : specials) {
    KILN_CHECK(s.id < n, source, ": special token ", quote_name(s.content), " has id ", s.id, " outside the vocabulary of ", n);
    KILN_CHECK(!s.content.empty(), source, ": special token ", s.id, " is empty");
    tokens[s.id] = s.content;
    raw[s.id] = true;
  }
  t.tokens_ = std::move(tokens);
  t.raw_ = std::move(raw);
  t.token_to_id_.reserve(n);
  for (uint32_t id = 0; id < n; id++)
    if (!t.raw_[id]) t.token_to_id_.emplace(t.tokens_[id], id);
  for (int b = 0; b < 256; b++) {
    auto it = t.token_to_id_.find(std::string(1, char(b)));
    KILN_CHECK(it != t.token_to_id_.end(), source, ": the vocabulary lacks the single byte 0x", std::hex, b,
               " (byte-level BPE needs all 256)");
    t.byte_id_[b] = it->second;
  }
  t.ranks_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); r++) {
    auto [a, b] = merges[r];
    KILN_CHECK(a < n && b < n, source, ": merge ", r + 1, " refers to id ", std::max(a, b), " outside the vocabulary");
    auto it = t.token_to_id_.find(t.tokens_[a] + t.tokens_[b]);
    KILN_CHECK(it != t.token_to_id_.end(), source, ": merge ", r + 1, " (", bytelevel::to_unicode(t.tokens_[a]), " ",
               bytelevel::to_unicode(t.tokens_[b]), ") makes a token that is not in the vocabulary");
    t.ranks_.set(a, b, {uint32_t(r), it->second});  // a repeated merge keeps its last rank, as GPT-2's dict does
  }
  t.merges_ = merges;
  // Longest first, so that at one position the longest special token wins.
  std::stable_sort(specials.begin(), specials.end(),
                   [](const SpecialToken& x, const SpecialToken& y) { return x.content.size() > y.content.size(); });
  t.specials_ = std::move(specials);
  for (uint32_t k = 0; k < t.specials_.size(); k++) (t.specials_[k].normalized ? t.normalized_ : t.unnormalized_).push_back(k);
  for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>"}) {
    for (const SpecialToken& s : t.specials_)
      if (s.content == name && !t.eot_) t.eot_ = s.id;
  }
  t.ignore_merges_ = ignore_merges;
  t.pre_ = pre;
  t.serial_ = next_serial++;
  return t;
}

const char* gguf_pre_name(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::kGpt2:
      return "gpt-2";
    case PreTokenizer::kLlama3:
      return "llama-bpe";
    case PreTokenizer::kQwen2:
      return "qwen2";
  }
  return "gpt-2";
}

TokenType Tokenizer::token_type(uint32_t id) const {
  KILN_CHECK(id < tokens_.size(), "token id ", id, " is outside the vocabulary of ", tokens_.size());
  for (const SpecialToken& s : specials_)
    if (s.id == id) return s.special ? TokenType::kControl : TokenType::kUserDefined;
  return TokenType::kNormal;
}

std::vector<TokenType> Tokenizer::token_types() const {
  std::vector<TokenType> types(tokens_.size(), TokenType::kNormal);
  for (const SpecialToken& s : specials_) types[s.id] = s.special ? TokenType::kControl : TokenType::kUserDefined;
  return types;
}

void Tokenizer::set_config(TokenizerConfig c, const std::string& source) {
  auto id_of = [&](const std::optional<std::string>& content, const char* field) -> std::optional<uint32_t> {
    if (!content) return std::nullopt;
    auto id = token_id(*content);
    KILN_CHECK(id, source, ": ", field, " ", quote_name(*content), " is not a token of the vocabulary");
    return id;
  };
  std::optional<uint32_t> bos = id_of(c.bos_token, "bos_token"), eos = id_of(c.eos_token, "eos_token");
  prefix_ = post_prefix_;
  suffix_ = post_suffix_;
  if (c.add_bos_token) {
    KILN_CHECK(!*c.add_bos_token || bos, source, ": add_bos_token is true but there is no bos_token");
    prefix_ = *c.add_bos_token ? std::vector<uint32_t>{*bos} : std::vector<uint32_t>{};
  }
  if (c.add_eos_token) {
    KILN_CHECK(!*c.add_eos_token || eos, source, ": add_eos_token is true but there is no eos_token");
    suffix_ = *c.add_eos_token ? std::vector<uint32_t>{*eos} : std::vector<uint32_t>{};
  }
  if (bos) bos_ = bos;
  if (eos) eot_ = eos;
  config_ = std::move(c);
}

std::optional<uint32_t> Tokenizer::token_id(std::string_view bytes) const {
  for (const SpecialToken& s : specials_)
    if (s.content == bytes) return s.id;
  auto it = token_to_id_.find(std::string(bytes));
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

// ---- encoding --------------------------------------------------------------------------------------

namespace {
constexpr uint32_t kNoRank = ~uint32_t(0);
constexpr size_t kShortWord = 128;  // longer pre-tokens use the heap-based merge loop
}  // namespace

void Tokenizer::bpe_short(std::string_view word, std::vector<uint32_t>& out) const {
  thread_local std::vector<uint32_t> ids, rk;
  size_t m = word.size();
  ids.resize(m);
  rk.resize(m);
  for (size_t i = 0; i < m; i++) ids[i] = byte_id_[uint8_t(word[i])];
  auto rank_at = [&](size_t i) {
    const bpe_detail::MergeInfo* mi = ranks_.find(ids[i], ids[i + 1]);
    return mi ? mi->rank : kNoRank;
  };
  for (size_t i = 0; i + 1 < m; i++) rk[i] = rank_at(i);
  while (m > 1) {
    size_t k = 0;
    uint32_t best = kNoRank;
    for (size_t i = 0; i + 1 < m; i++)
      if (rk[i] < best) {
        best = rk[i];
        k = i;
      }
    if (best == kNoRank) break;
    const uint32_t a = ids[k], b = ids[k + 1];
    const uint32_t merged = ranks_.find(a, b)->id;
    // Every occurrence of (a, b), left to right, without overlap.
    size_t w = k;
    for (size_t i = k; i < m;) {
      if (i + 1 < m && ids[i] == a && ids[i + 1] == b) {
        ids[w++] = merged;
        i += 2;
      } else {
        ids[w++] = ids[i++];
      }
    }
    m = w;
    for (size_t i = k > 0 ? k - 1 : 0; i + 1 < m; i++) rk[i] = rank_at(i);
  }
  out.insert(out.end(), ids.begin(), ids.begin() + m);
}

void Tokenizer::bpe_long(std::string_view word, std::vector<uint32_t>& out) const {
  // Same rule as bpe_short on a linked list: pop all candidate pairs of the lowest rank (they come out
  // in position order) and merge those still valid; new neighbour pairs go back on the heap.
  struct Node {
    uint32_t id;
    int32_t prev, next;
    bool alive;
  };
  const size_t m = word.size();
  std::vector<Node> nodes(m);
  for (size_t i = 0; i < m; i++)
    nodes[i] = {byte_id_[uint8_t(word[i])], int32_t(i) - 1, i + 1 < m ? int32_t(i + 1) : -1, true};
  std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0 || nodes[pos].next < 0) return;
    const bpe_detail::MergeInfo* mi = ranks_.find(nodes[pos].id, nodes[nodes[pos].next].id);
    if (mi) heap.push((uint64_t(mi->rank) << 32) | uint32_t(pos));
  };
  for (size_t i = 0; i + 1 < m; i++) push(int32_t(i));
  std::vector<int32_t> batch;
  while (!heap.empty()) {
    const uint32_t rank = uint32_t(heap.top() >> 32);
    batch.clear();
    while (!heap.empty() && uint32_t(heap.top() >> 32) == rank) {
      batch.push_back(int32_t(heap.top() & 0xffffffffu));
      heap.pop();
    }
    const auto [a, b] = merges_[rank];
    const uint32_t merged = ranks_.find(a, b)->id;
    for (int32_t pos : batch) {
      Node& nd = nodes[pos];
      if (!nd.alive || nd.id != a || nd.next < 0 || nodes[nd.next].id != b) continue;
      Node& right = nodes[nd.next];
      right.alive = false;
      nd.id = merged;
      nd.next = right.next;
      if (nd.next >= 0) nodes[nd.next].prev = pos;
    }
    // Pairs around merged nodes are new; push them after the whole batch so that this rank's merges
    // all see the word as it was, like GPT-2's single pass.
    for (int32_t pos : batch) {
      if (!nodes[pos].alive || nodes[pos].id != merged) continue;
      push(nodes[pos].prev);
      push(pos);
    }
  }
  for (int32_t i = 0; i >= 0; i = nodes[i].next) out.push_back(nodes[i].id);
}

void Tokenizer::encode_word(std::string_view word, std::vector<uint32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_id_[uint8_t(word[0])]);
    return;
  }
  thread_local bpe_detail::WordCache cache;
  if (cache.owner != serial_) {
    cache.clear();
    cache.owner = serial_;
  }
  const bool cacheable = word.size() <= bpe_detail::WordCache::kMaxKey;
  uint64_t h = 0;
  if (cacheable) {
    h = bpe_detail::hash_bytes(word);
    if (cache.lookup(word, h, out)) return;
  }
  const size_t before = out.size();
  if (ignore_merges_) {
    auto it = token_to_id_.find(std::string(word));
    if (it != token_to_id_.end()) out.push_back(it->second);
  }
  if (out.size() == before) {
    if (word.size() <= kShortWord)
      bpe_short(word, out);
    else
      bpe_long(word, out);
  }
  if (cacheable) cache.insert(word, h, out.data() + before, out.size() - before);
}

// Llama 3's and Qwen2's matchers; callers choose (a branch inside encode_ordinary cost GPT-2's loop ~4%).
[[gnu::noinline]] void Tokenizer::encode_ordinary_split(std::string_view text, std::vector<uint32_t>& out) const {
  pretok::pretokenize(pre_, text, [&](size_t b, size_t e) { encode_word(text.substr(b, e - b), out); });
}

void Tokenizer::encode_ordinary(std::string_view text, std::vector<uint32_t>& out) const {
  pretok::pretokenize(text, [&](size_t b, size_t e) { encode_word(text.substr(b, e - b), out); });
}

// Leftmost, then longest (specials_ is sorted longest first) match of the tokens in `group` within
// text[begin, end); calls ordinary(b, e) for the text between and special(id) for each match.
template <class Ordinary, class Special>
void Tokenizer::split_group(std::string_view text, size_t begin, size_t end, const std::vector<uint32_t>& group,
                            bool allow_special, Ordinary&& ordinary, Special&& special) const {
  std::vector<size_t> mine(group.size(), 0);  // next match of each token at or after pos
  std::vector<bool> known(group.size(), false);
  const std::string_view sub = text.substr(0, end);
  const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
  size_t pos = begin;
  while (pos < end) {
    size_t best = std::string_view::npos, bk = 0;
    for (size_t g = 0; g < group.size(); g++) {
      const SpecialToken& t = specials_[group[g]];
      if (!allow_special && t.special) continue;
      if (!known[g] || (mine[g] != std::string_view::npos && mine[g] < pos)) {
        mine[g] = sub.find(t.content, pos);
        known[g] = true;
      }
      if (mine[g] < best) {
        best = mine[g];
        bk = group[g];
      }
    }
    if (best == std::string_view::npos) break;
    const SpecialToken& t = specials_[bk];
    size_t from = best, to = best + t.content.size();
    if (t.lstrip) {
      // The whitespace run that ends at the match, not reaching back before pos.
      size_t ws = pos;
      for (size_t q = pos; q < best;) {
        pretok::Char c = pretok::next_char(s + q, s + best);
        q += c.len;
        if (c.cls != pretok::kSpace) ws = q;
      }
      from = ws;
    }
    if (t.rstrip) {
      while (to < end) {
        pretok::Char c = pretok::next_char(s + to, s + end);
        if (c.cls != pretok::kSpace) break;
        to += c.len;
      }
    }
    if (from > pos) ordinary(pos, from);
    special(t.id);
    pos = to;
  }
  if (pos < end) ordinary(pos, end);
}

template <class Ordinary, class Special>
void Tokenizer::split_specials(std::string_view text, bool allow_special, Ordinary&& ordinary,
                               Special&& special) const {
  if (specials_.empty() || (!allow_special && specials_.size() == 1 && specials_[0].special)) {
    if (!text.empty()) ordinary(size_t(0), text.size());
    return;
  }
  // Hugging Face's two passes: tokens with normalized=false over the text, then those with
  // normalized=true over what is left between them.
  split_group(
      text, 0, text.size(), unnormalized_, allow_special,
      [&](size_t b, size_t e) {
        if (normalized_.empty())
          ordinary(b, e);
        else
          split_group(text, b, e, normalized_, allow_special, ordinary, special);
      },
      special);
}

// Text between added tokens: normalized (NFC when the tokenizer.json asks for it), pre-tokenized, merged.
void Tokenizer::encode_text(std::string_view text, std::vector<uint32_t>& out) const {
  if (nfc_ && !nfc_is_identity(text)) {
    const std::string normalized = nfc(text);
    encode_text_normalized(normalized, out);
  } else {
    encode_text_normalized(text, out);
  }
}

void Tokenizer::encode_text_normalized(std::string_view text, std::vector<uint32_t>& out) const {
  if (pre_ == PreTokenizer::kGpt2)
    encode_ordinary(text, out);
  else
    encode_ordinary_split(text, out);
}

void Tokenizer::encode_append(std::string_view text, std::vector<uint32_t>& out, bool allow_special) const {
  split_specials(
      text, allow_special,
      [&](size_t b, size_t e) { encode_text(text.substr(b, e - b), out); },
      [&](uint32_t id) { out.push_back(id); });
}

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool allow_special, int threads) const {
  if (threads <= 0) threads = text.size() >= (size_t(1) << 20) ? omp_get_max_threads() : 1;
  std::vector<uint32_t> out;
  if (threads == 1) {
    out.reserve(text.size() / 3 + 16);
    encode_append(text, out, allow_special);
    return out;
  }
  // Cut the text at special tokens, then the ordinary stretches at safe split points about every
  // kChunk bytes; encode the pieces in parallel and concatenate in order.
  constexpr size_t kChunk = 256 << 10;
  struct Piece {
    size_t begin, end;
    int64_t special;  // -1 for text
  };
  std::vector<Piece> pieces;
  split_specials(
      text, allow_special,
      [&](size_t b, size_t e) {
        std::string_view seg = text.substr(b, e - b);
        size_t pos = 0;
        while (pos < seg.size()) {
          size_t cut = seg.size() - pos > 2 * kChunk ? pretok::next_safe_split(pre_, seg, pos + kChunk) : seg.size();
          pieces.push_back({b + pos, b + cut, -1});
          pos = cut;
        }
      },
      [&](uint32_t id) {
        pieces.push_back({0, 0, int64_t(id)});
      });
  std::vector<std::vector<uint32_t>> outs(pieces.size());
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < pieces.size(); i++) {
    const Piece& p = pieces[i];
    if (p.special >= 0)
      outs[i].push_back(uint32_t(p.special));
    else {
      // A local vector: the headers of neighbouring outs[] share a cache line, and every push_back
      // writes one (false sharing between threads).
      std::vector<uint32_t> local;
      local.reserve((p.end - p.begin) / 3 + 16);
      encode_text(text.substr(p.begin, p.end - p.begin), local);
      outs[i] = std::move(local);
    }
  }
  size_t total = 0;
  for (const auto& o : outs) total += o.size();
  out.reserve(total);
  for (const auto& o : outs) out.insert(out.end(), o.begin(), o.end());
  return out;
}

// ---- decoding --------------------------------------------------------------------------------------

std::string Tokenizer::decode(const uint32_t* ids, size_t n) const {
  std::string s;
  for (size_t i = 0; i < n; i++) {
    KILN_CHECK(ids[i] < tokens_.size(), "token id ", ids[i], " at position ", i, " is outside the vocabulary of ",
               tokens_.size());
    s += tokens_[ids[i]];
  }
  return s;
}

std::string Tokenizer::decode_token(uint32_t id) const {
  KILN_CHECK(id < tokens_.size(), "token id ", id, " is outside the vocabulary of ", tokens_.size());
  return tokens_[id];
}

}  // namespace kiln
