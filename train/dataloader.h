// Batches of B rows × T tokens (and next-token targets) from memory-mapped token shards.
//
// sequential (llm.c's loader): each batch takes B·T+1 consecutive tokens at the current position of
//   the current shard; inputs are the first B·T as B rows of T, targets the same shifted by one; the
//   position advances by B·T; when the next batch would run past the shard's end the loader moves to
//   the next shard (after the last, back to the first) at position 0.
// shuffled (default): every shard is cut into windows of T+1 tokens at stride T; each epoch visits all
//   windows of all shards in an order drawn from (seed, epoch); a batch is the next B windows.
// The loader's whole state is three integers, saved in checkpoints, so a resumed run sees exactly
// the batches an uninterrupted run would.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/batch.h"
#include "train/shards.h"

namespace kiln {

class DataLoader : public BatchSource {
 public:
  enum class Order { Sequential, Shuffled };
  static Order parse_order(const std::string& s);

  // pattern: one file or a glob. vocab_size > 0 validates every token against it.
  DataLoader(const std::string& pattern, int B, int T, Order order, uint64_t seed, int vocab_size);

  // Fills inputs and targets ([B·T] each) with the next batch and advances.
  void next(int32_t* inputs, int32_t* targets);
  // The same as a Batch of B rows of T with positions 0..T-1.
  void next(Batch& batch) override;

  LoaderState state() const override { return state_; }
  void set_state(const LoaderState& s) override;
  int64_t total_tokens() const { return total_tokens_; }
  size_t num_shards() const { return shards_.size(); }

 private:
  int B_, T_;
  Order order_;
  uint64_t seed_;
  std::vector<std::unique_ptr<TokenShard>> shards_;
  int64_t total_tokens_ = 0;
  LoaderState state_;
  // shuffled: windows per shard, their prefix sums, and the current epoch's permutation
  std::vector<int64_t> windows_prefix_;
  std::vector<int64_t> perm_;
  int64_t perm_epoch_ = -1;
  void build_permutation(int64_t epoch);
};

}  // namespace kiln
