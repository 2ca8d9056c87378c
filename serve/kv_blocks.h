// Which KV-cache blocks each running sequence owns (the paged cache of models/model.h BatchDecoder), and the
// reuse of a shared prompt prefix across requests.
//
// A sequence takes every block it can need when it is admitted (prompt + max tokens), so a running sequence
// never waits for memory; a request that does not fit waits in the queue. Full blocks of a prompt are
// published once computed, keyed by a hash chained over the tokens of every block up to and including them
// (and checked token for token, so a collision can only miss). A later prompt that starts with the same
// blocks takes them (reference counted) and prefills only the rest. Published blocks stay cached when their
// last user leaves and are evicted least recently used first when the free list is empty.
//
// Shared blocks are never written: only blocks inside prompt[0, P - 1) are shared, so the prompt's last token
// (whose logits the first sample needs) always runs in a block of the sequence's own.
#pragma once
#include <cstdint>
#include <set>
#include <unordered_map>
#include <vector>

namespace kiln::serve {

class BlockPool {
 public:
  BlockPool(int num_blocks, int block_size, bool prefix_cache);

  // Blocks for a sequence with this prompt that will reach `total` positions. On success `blocks` holds
  // ceil(total / block_size) ids, of which the first cached_tokens / block_size are shared prefix blocks.
  // Returns false (and takes nothing) when the pool cannot give them now.
  bool acquire(const std::vector<int32_t>& prompt, int total, std::vector<int32_t>& blocks, int& cached_tokens);
  // The prompt's KV is computed: its full blocks (within prompt[0, P - 1)) become reusable.
  void publish(const std::vector<int32_t>& prompt, const std::vector<int32_t>& blocks);
  void release(const std::vector<int32_t>& blocks);

  int blocks_for(int positions) const { return (positions + block_size_ - 1) / block_size_; }
  int num_blocks() const { return int(blocks_.size()); }
  int used_blocks() const { return used_; }         // referenced by a running sequence
  int cached_blocks() const { return int(evictable_.size()); }
  int block_size() const { return block_size_; }

 private:
  struct Block {
    int ref = 0;
    bool cached = false;
    uint64_t key = 0, parent_key = 0, tick = 0;
    std::vector<int32_t> tokens;  // a cached block's tokens (verified on a hit)
  };
  std::vector<Block> blocks_;
  int block_size_;
  bool prefix_cache_;
  int used_ = 0;
  uint64_t tick_ = 0;
  std::vector<int32_t> free_;                       // not referenced, not cached
  std::unordered_map<uint64_t, int32_t> cache_;     // chained key -> block
  std::set<std::pair<uint64_t, int32_t>> evictable_;  // (last use, block): cached and not referenced

  // The cached blocks the prompt starts with.
  std::vector<int32_t> lookup(const std::vector<int32_t>& prompt) const;
  int32_t take_free();
  void ref(int32_t b);
};

}  // namespace kiln::serve
