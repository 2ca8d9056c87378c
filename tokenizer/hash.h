// Small open-addressing hash tables for the BPE hot path: merge ranks keyed by a pair of token ids, and
// a cache from a pre-token's bytes to its token ids.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::bpe_detail {

inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// Never returns 0 (0 marks an empty cache slot).
inline uint64_t hash_bytes(std::string_view s) {
  const char* p = s.data();
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xC2B2AE3D27D4EB4Full);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ v) * 0xc4ceb9fe1a85ec53ull;
  }
  return mix64(h) | 1;
}

struct MergeInfo {
  uint32_t rank;
  uint32_t id;  // the merged token
};

// (left id, right id) -> MergeInfo. Built once; lookups only afterwards.
class PairMap {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, MergeInfo{0, 0});
    mask_ = cap - 1;
  }
  // Inserts or overwrites.
  void set(uint32_t a, uint32_t b, MergeInfo v) {
    uint64_t key = (uint64_t(a) << 32) | b;
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      if (keys_[i] == kEmpty || keys_[i] == key) {
        keys_[i] = key;
        vals_[i] = v;
        return;
      }
    }
  }
  const MergeInfo* find(uint32_t a, uint32_t b) const {
    uint64_t key = (uint64_t(a) << 32) | b;
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      if (keys_[i] == key) return &vals_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // the pair (2^32-1, 2^32-1) never occurs
  std::vector<uint64_t> keys_ = std::vector<uint64_t>(16, kEmpty);
  std::vector<MergeInfo> vals_ = std::vector<MergeInfo>(16);
  size_t mask_ = 15;
};

// Pre-token bytes -> token ids. Grows to a bound, then starts over (text has a heavy-tailed word
// distribution, so the frequent words come back at once).
class WordCache {
 public:
  static constexpr size_t kMaxKey = 64;          // longer pre-tokens are not cached
  static constexpr size_t kMaxSlots = 1u << 20;  // ~ 40 MB per thread at most

  uint64_t owner = 0;  // which Tokenizer filled it

  void clear() {
    slots_.assign(1u << 14, Slot{});
    keys_.clear();
    vals_.clear();
    used_ = 0;
  }
  // Appends the cached ids of `key` to out and returns true, or returns false.
  bool lookup(std::string_view key, uint64_t h, std::vector<uint32_t>& out) const {
    if (slots_.empty()) return false;
    size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return false;
      if (s.hash == h && s.key_len == key.size() &&
          std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0) {
        out.insert(out.end(), vals_.begin() + s.val_off, vals_.begin() + s.val_off + s.val_len);
        return true;
      }
    }
  }
  void insert(std::string_view key, uint64_t h, const uint32_t* ids, size_t n) {
    if (slots_.empty() || 2 * (used_ + 1) > slots_.size()) {
      if (slots_.size() >= kMaxSlots || slots_.empty())
        clear();
      else
        grow();
    }
    size_t mask = slots_.size() - 1;
    size_t i = h & mask;
    while (slots_[i].hash != 0) i = (i + 1) & mask;
    slots_[i] = Slot{h, uint32_t(keys_.size()), uint32_t(key.size()), uint32_t(vals_.size()), uint32_t(n)};
    keys_.append(key);
    vals_.insert(vals_.end(), ids, ids + n);
    used_++;
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = 0, val_off = 0, val_len = 0;
  };
  void grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask;
      while (slots_[i].hash != 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<uint32_t> vals_;
  size_t used_ = 0;
};

}  // namespace kiln::bpe_detail
