#include "train/dataloader.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "core/file_io.h"
#include "core/rng.h"

namespace kiln {

DataLoader::Order DataLoader::parse_order(const std::string& s) {
  if (s == "sequential") return Order::Sequential;
  if (s == "shuffled") return Order::Shuffled;
  fail("--data-order: expected sequential or shuffled, got '", s, "'");
}

DataLoader::DataLoader(const std::string& pattern, int B, int T, Order order, uint64_t seed, int vocab_size)
    : B_(B), T_(T), order_(order), seed_(seed) {
  KILN_CHECK(B > 0 && T > 0, "batch and sequence length must be positive");
  for (const auto& path : expand_glob(pattern)) {
    auto shard = std::make_unique<TokenShard>(path);
    if (vocab_size > 0) shard->check_vocab(vocab_size);
    total_tokens_ += shard->size();
    shards_.push_back(std::move(shard));
  }
  const int64_t need = order == Order::Sequential ? int64_t(B) * T + 1 : int64_t(T) + 1;
  windows_prefix_.push_back(0);
  for (const auto& s : shards_) {
    KILN_CHECK(s->size() >= need, s->path(), ": has ", s->size(), " tokens, fewer than one batch needs (", need,
               ")");
    windows_prefix_.push_back(windows_prefix_.back() + (s->size() - 1) / T);
  }
}

void DataLoader::set_state(const LoaderState& s) {
  KILN_CHECK(s.shard >= 0 && s.shard < int64_t(shards_.size()) && s.position >= 0 && s.epoch >= 0,
             "data loader state out of range for these shards (shard ", s.shard, ", position ", s.position, ")");
  state_ = s;
}

void DataLoader::build_permutation(int64_t epoch) {
  const int64_t n = windows_prefix_.back();
  perm_.resize(size_t(n));
  std::iota(perm_.begin(), perm_.end(), int64_t(0));
  Rng rng(seed_ ^ 0x5eed5eed5eedull, uint64_t(epoch) << 40);
  for (int64_t i = n - 1; i > 0; i--) std::swap(perm_[size_t(i)], perm_[size_t(rng.below(uint64_t(i + 1)))]);
  perm_epoch_ = epoch;
}

void DataLoader::next(Batch& batch) {
  batch.B = B_;
  batch.T = T_;
  batch.cu_seqlens.clear();
  batch.resize(int64_t(B_) * T_);
  next(batch.tokens.data(), batch.targets.data());
  for (int64_t i = 0; i < batch.n_tokens; i++) batch.pos[size_t(i)] = int32_t(i % T_);
}

void DataLoader::next(int32_t* inputs, int32_t* targets) {
  const int64_t BT = int64_t(B_) * T_;
  if (order_ == Order::Sequential) {
    if (state_.position + BT + 1 > shards_[size_t(state_.shard)]->size()) {
      state_.shard = (state_.shard + 1) % int64_t(shards_.size());
      if (state_.shard == 0) state_.epoch++;
      state_.position = 0;
    }
    const TokenShard& s = *shards_[size_t(state_.shard)];
    for (int64_t i = 0; i < BT; i++) {
      inputs[i] = int32_t(s[state_.position + i]);
      targets[i] = int32_t(s[state_.position + i + 1]);
    }
    state_.position += BT;
    return;
  }
  for (int b = 0; b < B_; b++) {
    if (state_.position >= windows_prefix_.back()) {
      state_.epoch++;
      state_.position = 0;
    }
    if (perm_epoch_ != state_.epoch) build_permutation(state_.epoch);
    int64_t w = perm_[size_t(state_.position++)];
    size_t sh = size_t(std::upper_bound(windows_prefix_.begin(), windows_prefix_.end(), w) - windows_prefix_.begin() - 1);
    int64_t start = (w - windows_prefix_[sh]) * T_;
    const TokenShard& s = *shards_[sh];
    for (int t = 0; t < T_; t++) {
      inputs[int64_t(b) * T_ + t] = int32_t(s[start + t]);
      targets[int64_t(b) * T_ + t] = int32_t(s[start + t + 1]);
    }
  }
}

}  // namespace kiln
