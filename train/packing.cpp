#include "train/packing.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "core/file_io.h"
#include "core/rng.h"
#include "train/doc_index.h"

namespace kiln {

DocumentSet::DocumentSet(const std::string& pattern, int vocab_size) {
  const std::vector<std::string> paths = expand_glob(pattern);
  KILN_CHECK(!paths.empty(), pattern, ": no token shards match");
  shard_start_.push_back(0);
  for (const auto& path : paths) {
    auto shard = std::make_unique<TokenShard>(path);
    if (vocab_size > 0) shard->check_vocab(vocab_size);
    const std::string idx = path + ".idx";
    KILN_CHECK(file_exists(idx), idx, ": no document index (packed and padded batching need the .idx that "
               "`kiln data prepare` writes beside each shard)");
    const int64_t base = shard_start_.back();
    for (int64_t s : read_doc_index(idx, shard->size())) {
      // A stream that does not open with a listed start opens with a document of its own.
      if (doc_start_.empty() && base + s > 0) doc_start_.push_back(0);
      doc_start_.push_back(base + s);
    }
    shard_start_.push_back(base + shard->size());
    shards_.push_back(std::move(shard));
  }
  // Masks: all shards or none (a mix would silently train on some prompts).
  size_t with_mask = 0;
  for (const auto& s : shards_) with_mask += file_exists(s->path() + ".mask");
  if (with_mask > 0) {
    for (const auto& s : shards_) {
      KILN_CHECK(file_exists(s->path() + ".mask"), s->path(), ".mask: missing, but other shards matched by ",
                 pattern, " have loss masks");
      masks_.push_back(std::make_unique<LossMask>(s->path() + ".mask", s->size()));
    }
  }
  const int64_t total = shard_start_.back();
  KILN_CHECK(total > 0, pattern, ": the shards hold no tokens");
  if (doc_start_.empty()) doc_start_.push_back(0);
  doc_start_.push_back(total);
}

size_t DocumentSet::shard_of(int64_t g) const {
  return size_t(std::upper_bound(shard_start_.begin(), shard_start_.end(), g) - shard_start_.begin() - 1);
}

void DocumentSet::fill(int64_t doc, int64_t begin, int64_t n, int32_t* tokens, int32_t* targets) const {
  const int64_t start = doc_start_[size_t(doc)], end = doc_start_[size_t(doc + 1)];
  // Read n+1 tokens (the last one only as a target) shard run by shard run.
  const int64_t g0 = start + begin, g1 = std::min(end, g0 + n + 1);
  size_t sh = shard_of(g0);
  for (int64_t g = g0; g < g1;) {
    while (g >= shard_start_[sh + 1]) sh++;
    const TokenShard& s = *shards_[sh];
    const LossMask* m = masks_.empty() ? nullptr : masks_[sh].get();
    const int64_t run_end = std::min(g1, shard_start_[sh + 1]);
    for (; g < run_end; g++) {
      const int64_t i = g - g0, local = g - shard_start_[sh];
      const int32_t t = int32_t(s[local]);
      if (i < n) tokens[i] = t;
      if (i > 0) targets[i - 1] = (!m || (*m)[local]) ? t : -1;
    }
  }
  if (g1 - g0 == n) targets[n - 1] = -1;  // the document's last token predicts nothing
}

DocumentBatchSource::DocumentBatchSource(std::shared_ptr<const DocumentSet> docs, bool shuffled, uint64_t seed,
                                         int64_t whole_max, int64_t piece)
    : docs_(std::move(docs)), shuffled_(shuffled), seed_(seed), whole_max_(whole_max), piece_(piece) {
  KILN_CHECK(piece > 0 && whole_max >= piece, "batching: sequence limits must be positive");
}

void DocumentBatchSource::set_state(const LoaderState& s) {
  const int64_t n = docs_->num_documents();
  bool ok = s.epoch >= 0 && s.position >= 0 && s.position <= n && s.shard >= 0;
  if (ok && s.position == n) ok = s.shard == 0;
  const LoaderState old = state_;
  state_ = s;  // doc_at reads the epoch
  if (ok && s.position < n) ok = s.shard < docs_->length(doc_at(s.position));
  if (!ok) {
    state_ = old;
    fail("data loader state out of range for these documents (epoch ", s.epoch, ", document ", s.position,
         ", offset ", s.shard, "; ", n, " documents)");
  }
}

int64_t DocumentBatchSource::doc_at(int64_t position) {
  if (!shuffled_) return position;
  if (perm_epoch_ != state_.epoch) {
    const int64_t n = docs_->num_documents();
    perm_.resize(size_t(n));
    std::iota(perm_.begin(), perm_.end(), int64_t(0));
    Rng rng(seed_ ^ 0x9ac4ed5eedull, uint64_t(state_.epoch) << 40);
    for (int64_t i = n - 1; i > 0; i--) std::swap(perm_[size_t(i)], perm_[size_t(rng.below(uint64_t(i + 1)))]);
    perm_epoch_ = state_.epoch;
  }
  return perm_[size_t(position)];
}

bool DocumentBatchSource::current(SequenceRef& seq, bool may_start_epoch) {
  if (state_.position == docs_->num_documents()) {
    if (!may_start_epoch) return false;
    state_.epoch++;
    state_.position = 0;
    state_.shard = 0;
  }
  seq.doc = doc_at(state_.position);
  const int64_t len = docs_->length(seq.doc);
  seq.begin = state_.shard;
  seq.len = len <= whole_max_ ? len : std::min(piece_, len - seq.begin);
  return true;
}

void DocumentBatchSource::advance(const SequenceRef& seq) {
  if (seq.begin + seq.len < docs_->length(seq.doc)) {
    state_.shard = seq.begin + seq.len;
  } else {
    state_.position++;
    state_.shard = 0;
  }
}

PackedSource::PackedSource(std::shared_ptr<const DocumentSet> docs, int B, int T, int n_positions, bool shuffled,
                           uint64_t seed)
    : DocumentBatchSource(std::move(docs), shuffled, seed, std::min<int64_t>(int64_t(B) * T, n_positions),
                          std::min(T, n_positions)),
      budget_(int64_t(B) * T) {
  KILN_CHECK(B > 0 && T > 0, "batch and sequence length must be positive");
}

void PackedSource::next(Batch& batch) {
  batch.cu_seqlens.assign(1, 0);
  batch.tokens.resize(size_t(budget_));
  batch.targets.resize(size_t(budget_));
  batch.pos.resize(size_t(budget_));
  int64_t n = 0;
  SequenceRef seq;
  // Every sequence fits an empty batch (len <= whole_max <= budget), so each batch holds at least one.
  while (current(seq, /*may_start_epoch=*/n == 0) && n + seq.len <= budget_) {
    docs_->fill(seq.doc, seq.begin, seq.len, batch.tokens.data() + n, batch.targets.data() + n);
    for (int64_t i = 0; i < seq.len; i++) batch.pos[size_t(n + i)] = int32_t(i);
    n += seq.len;
    batch.cu_seqlens.push_back(int32_t(n));
    advance(seq);
  }
  batch.resize(n);
  batch.B = 1;
  batch.T = int(n);
}

PaddedSource::PaddedSource(std::shared_ptr<const DocumentSet> docs, int B, int T, int n_positions, bool shuffled,
                           uint64_t seed)
    : DocumentBatchSource(std::move(docs), shuffled, seed, std::min(T, n_positions), std::min(T, n_positions)),
      B_(B),
      T_(T) {
  KILN_CHECK(B > 0 && T > 0, "batch and sequence length must be positive");
  KILN_CHECK(T <= n_positions, "padded batching: --seq ", T, " exceeds the model's n_positions ", n_positions);
}

void PaddedSource::next(Batch& batch) {
  batch.cu_seqlens.clear();
  batch.tokens.resize(size_t(B_) * T_);
  batch.targets.resize(size_t(B_) * T_);
  batch.pos.resize(size_t(B_) * T_);
  int rows = 0;
  SequenceRef seq;
  while (rows < B_ && current(seq, /*may_start_epoch=*/rows == 0)) {
    const size_t r = size_t(rows) * T_;
    docs_->fill(seq.doc, seq.begin, seq.len, batch.tokens.data() + r, batch.targets.data() + r);
    for (int64_t i = seq.len; i < T_; i++) {
      batch.tokens[r + size_t(i)] = 0;  // padding: any id, never a target
      batch.targets[r + size_t(i)] = -1;
    }
    for (int i = 0; i < T_; i++) batch.pos[r + size_t(i)] = i;
    advance(seq);
    rows++;
  }
  batch.resize(int64_t(rows) * T_);
  batch.B = rows;
  batch.T = T_;
}

}  // namespace kiln
