#include "tokenizer/train.h"

#include <omp.h>

#include <algorithm>
#include <queue>
#include <unordered_map>

#include "core/error.h"
#include "core/file_io.h"
#include "tokenizer/pretokenize.h"

namespace kiln {

namespace {

// Ordinary stretches of text between special-token strings.
void split_out_specials(std::string_view text, const std::vector<std::string>& specials,
                        std::vector<std::string_view>& out) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t best = std::string_view::npos, len = 0;
    for (const auto& s : specials) {
      if (s.empty()) continue;
      size_t f = text.find(s, pos);
      if (f < best || (f == best && s.size() > len)) {
        best = f;
        len = s.size();
      }
    }
    if (best == std::string_view::npos) break;
    if (best > pos) out.push_back(text.substr(pos, best - pos));
    pos = best + len;
  }
  if (pos < text.size()) out.push_back(text.substr(pos));
}

uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

struct Word {
  std::vector<uint32_t> ids;
  int64_t count;
};

}  // namespace

std::vector<std::pair<std::string, int64_t>> count_pretokens(const std::vector<std::string_view>& texts,
                                                             const std::vector<std::string>& specials, int threads,
                                                             PreTokenizer pre) {
  std::vector<std::string_view> segs, chunks;
  for (auto t : texts) split_out_specials(t, specials, segs);
  // Cut long stretches at safe split points so that threads share the work.
  constexpr size_t kChunk = 1 << 20;
  for (auto seg : segs) {
    size_t pos = 0;
    while (pos < seg.size()) {
      size_t cut = seg.size() - pos > 2 * kChunk ? pretok::next_safe_split(pre, seg, pos + kChunk) : seg.size();
      chunks.push_back(seg.substr(pos, cut - pos));
      pos = cut;
    }
  }
  if (threads <= 0) threads = omp_get_max_threads();
  threads = std::max(1, std::min<int>(threads, int(chunks.size())));
  std::vector<std::unordered_map<std::string_view, int64_t>> maps(threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < chunks.size(); i++) {
    auto& m = maps[omp_get_thread_num()];
    std::string_view c = chunks[i];
    pretok::pretokenize(pre, c, [&](size_t b, size_t e) { m[c.substr(b, e - b)]++; });
  }
  for (int t = 1; t < threads; t++)
    for (auto& [k, v] : maps[t]) maps[0][k] += v;
  std::vector<std::pair<std::string, int64_t>> out;
  out.reserve(maps[0].size());
  for (auto& [k, v] : maps[0]) out.emplace_back(std::string(k), v);
  std::sort(out.begin(), out.end());
  return out;
}

Tokenizer train_bpe_texts(const std::vector<std::string_view>& texts, const BpeTrainOptions& opt) {
  const int n_special = int(opt.special_tokens.size());
  KILN_CHECK(opt.vocab_size >= 256 + n_special, "--vocab-size ", opt.vocab_size,
             " is too small: it needs the 256 bytes",
             n_special ? str(" and ", n_special, " special token(s)") : std::string());
  const int wanted = opt.vocab_size - 256 - n_special;

  // Byte tokens in GPT-2's order.
  std::vector<std::string> tokens;
  uint32_t byte_id[256];
  for (uint8_t b : bytelevel::gpt2_byte_order()) {
    byte_id[b] = uint32_t(tokens.size());
    tokens.emplace_back(1, char(b));
  }

  std::vector<Word> words;
  for (auto& [w, c] : count_pretokens(texts, opt.special_tokens, opt.threads, opt.pre_tokenizer)) {
    Word word{{}, c};
    for (unsigned char ch : w) word.ids.push_back(byte_id[ch]);
    words.push_back(std::move(word));
  }

  std::unordered_map<uint64_t, int64_t> counts;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where;  // pair -> words that have (or had) it
  for (uint32_t w = 0; w < words.size(); w++) {
    const auto& ids = words[w].ids;
    for (size_t i = 0; i + 1 < ids.size(); i++) {
      uint64_t k = pair_key(ids[i], ids[i + 1]);
      counts[k] += words[w].count;
      auto& v = where[k];
      if (v.empty() || v.back() != w) v.push_back(w);
    }
  }

  // Max-heap of (count, pair); among equal counts the pair with smaller (left, right) bytes first.
  struct Entry {
    int64_t count;
    uint32_t a, b;
  };
  auto lower = [&](const Entry& x, const Entry& y) {
    if (x.count != y.count) return x.count < y.count;
    int c = tokens[x.a].compare(tokens[y.a]);
    if (c != 0) return c > 0;
    return tokens[x.b] > tokens[y.b];
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(lower)> heap(lower);
  for (auto& [k, c] : counts) heap.push({c, uint32_t(k >> 32), uint32_t(k)});

  std::vector<std::pair<uint32_t, uint32_t>> merges;
  std::vector<int> visited(words.size(), -1);
  std::vector<uint64_t> grown;
  while (int(merges.size()) < wanted && !heap.empty()) {
    Entry top = heap.top();
    heap.pop();
    const uint64_t key = pair_key(top.a, top.b);
    auto it = counts.find(key);
    const int64_t cur = it == counts.end() ? 0 : it->second;
    if (cur != top.count) {
      // Stale: its count fell since it was pushed (a rise always pushes a fresh entry).
      if (cur > 0 && cur < top.count) heap.push({cur, top.a, top.b});
      continue;
    }
    if (cur < opt.min_pair_count) break;
    const uint32_t a = top.a, b = top.b, merged = uint32_t(tokens.size());
    tokens.push_back(tokens[a] + tokens[b]);
    merges.emplace_back(a, b);
    const int step = int(merges.size());
    grown.clear();
    std::vector<uint32_t> list = std::move(where[key]);
    where.erase(key);
    for (uint32_t w : list) {
      if (visited[w] == step) continue;
      visited[w] = step;
      Word& word = words[w];
      auto& ids = word.ids;
      bool has = false;
      for (size_t i = 0; i + 1 < ids.size() && !has; i++) has = ids[i] == a && ids[i + 1] == b;
      if (!has) continue;
      for (size_t i = 0; i + 1 < ids.size(); i++) {
        auto c = counts.find(pair_key(ids[i], ids[i + 1]));
        if ((c->second -= word.count) == 0) counts.erase(c);
      }
      // Merge left to right without overlap, as the encoder does.
      size_t o = 0;
      for (size_t i = 0; i < ids.size();) {
        if (i + 1 < ids.size() && ids[i] == a && ids[i + 1] == b) {
          ids[o++] = merged;
          i += 2;
        } else {
          ids[o++] = ids[i++];
        }
      }
      ids.resize(o);
      for (size_t i = 0; i + 1 < ids.size(); i++) {
        uint64_t k = pair_key(ids[i], ids[i + 1]);
        counts[k] += word.count;
        if (ids[i] == merged || ids[i + 1] == merged) {
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
          grown.push_back(k);
        }
      }
    }
    // Only pairs with the new token can have grown.
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (uint64_t k : grown) {
      auto c = counts.find(k);
      if (c != counts.end()) heap.push({c->second, uint32_t(k >> 32), uint32_t(k)});
    }
    if (opt.progress && (step % 64 == 0 || step == wanted)) opt.progress(step, wanted);
  }
  if (opt.progress) opt.progress(int(merges.size()), wanted);

  std::vector<SpecialToken> specials;
  for (const auto& s : opt.special_tokens) {
    specials.push_back({s, uint32_t(tokens.size())});
    tokens.push_back(s);
  }
  return Tokenizer::from_parts(std::move(tokens), merges, std::move(specials), {}, "trained tokenizer", false,
                               opt.pre_tokenizer);
}

Tokenizer train_bpe(const std::vector<std::string>& files, const BpeTrainOptions& opt) {
  KILN_CHECK(!files.empty(), "no input files to train the tokenizer on");
  std::vector<MappedFile> maps;
  std::vector<std::string_view> texts;
  for (const auto& f : files) {
    KILN_CHECK(file_exists(f), f, ": no such file");
    maps.emplace_back(f);
    texts.emplace_back(reinterpret_cast<const char*>(maps.back().data()), maps.back().size());
  }
  size_t total = 0;
  for (auto t : texts) total += t.size();
  KILN_CHECK(total > 0, "no text found in ", files.size() == 1 ? files[0] : str(files.size(), " input files"));
  return train_bpe_texts(texts, opt);
}

}  // namespace kiln
