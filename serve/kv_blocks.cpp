#include "serve/kv_blocks.h"

#include <algorithm>

#include "core/error.h"

namespace kiln::serve {

namespace {

uint64_t mix(uint64_t h, uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h *= 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 31);
}

uint64_t block_key(uint64_t parent, const int32_t* t, int n) {
  uint64_t h = mix(parent, 0x51ed27ull);
  for (int i = 0; i < n; i++) h = mix(h, uint64_t(uint32_t(t[i])));
  return h;
}

}  // namespace

BlockPool::BlockPool(int num_blocks, int block_size, bool prefix_cache)
    : blocks_(size_t(num_blocks)), block_size_(block_size), prefix_cache_(prefix_cache) {
  KILN_CHECK(num_blocks >= 1 && block_size >= 1, "KV cache: ", num_blocks, " blocks of ", block_size, " positions");
  for (int i = num_blocks - 1; i >= 0; i--) free_.push_back(i);
}

std::vector<int32_t> BlockPool::lookup(const std::vector<int32_t>& prompt) const {
  std::vector<int32_t> hit;
  if (!prefix_cache_ || prompt.empty()) return hit;
  const int full = int(prompt.size() - 1) / block_size_;  // blocks inside prompt[0, P - 1)
  uint64_t parent = 0;
  for (int i = 0; i < full; i++) {
    const int32_t* t = prompt.data() + size_t(i) * block_size_;
    const uint64_t key = block_key(parent, t, block_size_);
    auto it = cache_.find(key);
    if (it == cache_.end()) break;
    const Block& b = blocks_[size_t(it->second)];
    if (b.parent_key != parent || !std::equal(b.tokens.begin(), b.tokens.end(), t)) break;
    hit.push_back(it->second);
    parent = key;
  }
  return hit;
}

int32_t BlockPool::take_free() {
  if (!free_.empty()) {
    const int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  // Evict the least recently used cached block.
  const auto it = evictable_.begin();
  const int32_t b = it->second;
  evictable_.erase(it);
  Block& blk = blocks_[size_t(b)];
  cache_.erase(blk.key);
  blk = Block{};
  return b;
}

void BlockPool::ref(int32_t b) {
  Block& blk = blocks_[size_t(b)];
  if (blk.ref == 0) {
    if (blk.cached) evictable_.erase({blk.tick, b});
    used_++;
  }
  blk.ref++;
}

bool BlockPool::acquire(const std::vector<int32_t>& prompt, int total, std::vector<int32_t>& blocks,
                        int& cached_tokens) {
  const int need = blocks_for(total);
  std::vector<int32_t> shared = lookup(prompt);
  if (int(shared.size()) > need) shared.resize(size_t(need));
  int shared_idle = 0;  // shared blocks that are evictable now (taking them removes them from the evictable set)
  for (int32_t b : shared) shared_idle += blocks_[size_t(b)].ref == 0;
  const int available = int(free_.size()) + int(evictable_.size()) - shared_idle;
  if (need - int(shared.size()) > available) return false;
  blocks = shared;
  for (int32_t b : shared) ref(b);
  while (int(blocks.size()) < need) {
    const int32_t b = take_free();
    ref(b);
    blocks.push_back(b);
  }
  cached_tokens = int(shared.size()) * block_size_;
  return true;
}

void BlockPool::publish(const std::vector<int32_t>& prompt, const std::vector<int32_t>& blocks) {
  if (!prefix_cache_ || prompt.empty()) return;
  const int full = std::min<int>(int(prompt.size() - 1) / block_size_, int(blocks.size()));
  uint64_t parent = 0;
  for (int i = 0; i < full; i++) {
    const int32_t* t = prompt.data() + size_t(i) * block_size_;
    const uint64_t key = block_key(parent, t, block_size_);
    Block& b = blocks_[size_t(blocks[size_t(i)])];
    if (!b.cached && !cache_.count(key)) {
      b.cached = true;
      b.key = key;
      b.parent_key = parent;
      b.tokens.assign(t, t + block_size_);
      cache_[key] = blocks[size_t(i)];
    }
    parent = key;
  }
}

void BlockPool::release(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    Block& blk = blocks_[size_t(b)];
    KILN_CHECK(blk.ref > 0, "KV cache: block ", b, " released more often than taken");
    if (--blk.ref > 0) continue;
    used_--;
    if (blk.cached) {
      blk.tick = ++tick_;
      evictable_.insert({blk.tick, b});
    } else {
      free_.push_back(b);
    }
  }
}

}  // namespace kiln::serve
