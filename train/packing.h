// Document-aware batching: whole documents packed without padding (PackedSource), or one document per
// padded row (PaddedSource, for comparison). Both read documents from token shards and their document
// indexes (X.bin + X.bin.idx, train/doc_index.h) and, for supervised data, loss masks (X.bin.mask,
// train/sft.h).
//
// Documents. The shards matched by the pattern are read in order as one token stream; document i spans
// [start_i, start_{i+1}) of that stream, so a document that spills from one shard into the next is one
// document. Tokens before the first listed start (a document that began in a shard not matched) form a
// document of their own, so every token is used.
//
// Sequences. A document is one sequence when it has at most `whole_max` tokens; a longer one is cut into
// pieces of `piece` tokens (the last shorter), each its own sequence with positions from 0:
//   packed: whole_max = min(B·T, n_positions), piece = min(T, n_positions)
//   padded: whole_max = piece = min(T, n_positions)   (a row holds at most T tokens)
// They are the same sequences whenever T == n_positions or no document is longer than T.
// Targets: token i of a sequence predicts the next token of its document (across a piece cut, too),
// and -1 at the document's last token, so nothing is predicted across documents. With loss masks the
// target is -1 wherever the predicted token has mask 0 (a prompt token).
//
// Order. Documents in file order (sequential; used for validation) or shuffled each epoch from
// (seed, epoch). A micro-batch never spans two epochs.
//   packed: sequences in order, back to back, while they fit in B·T tokens (greedy, in order); the batch
//           holds exactly the sequences' tokens (n_tokens <= B·T, no padding); cu_seqlens marks them.
//   padded: B sequences (fewer at the end of an epoch), each in a row of T tokens filled with token 0
//           whose target is -1; positions 0..T-1; cu_seqlens empty (plain causal rows).
// State (LoaderState): epoch, position = the next document in the epoch's order, shard = the token
// offset inside that document where a cut document continues (0 otherwise). --resume is exact.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/batch.h"
#include "train/sft.h"
#include "train/shards.h"

namespace kiln {

// The documents of a set of shards.
class DocumentSet {
 public:
  // pattern: one shard or a glob. vocab_size > 0 validates every token. Throws kiln::Error naming the
  // file for a missing .idx, a .mask present for some shards but not others, or no tokens at all.
  DocumentSet(const std::string& pattern, int vocab_size);

  int64_t num_documents() const { return int64_t(doc_start_.size()) - 1; }
  int64_t length(int64_t doc) const { return doc_start_[size_t(doc + 1)] - doc_start_[size_t(doc)]; }
  int64_t total_tokens() const { return doc_start_.back(); }
  bool has_mask() const { return !masks_.empty(); }

  // Tokens [begin, begin+n) of a document and their targets (see the header note).
  void fill(int64_t doc, int64_t begin, int64_t n, int32_t* tokens, int32_t* targets) const;

 private:
  std::vector<std::unique_ptr<TokenShard>> shards_;
  std::vector<std::unique_ptr<LossMask>> masks_;  // empty, or one per shard
  std::vector<int64_t> shard_start_;              // stream offset of each shard, then the total
  std::vector<int64_t> doc_start_;                // stream offset of each document, then the total
  size_t shard_of(int64_t g) const;
};

// One sequence: tokens [begin, begin + len) of document `doc`.
struct SequenceRef {
  int64_t doc = 0, begin = 0, len = 0;
};

// Walks the sequences of a DocumentSet in epoch order; the shared part of both sources.
class DocumentBatchSource : public BatchSource {
 public:
  // shuffled: a fresh document order each epoch from seed; otherwise file order.
  DocumentBatchSource(std::shared_ptr<const DocumentSet> docs, bool shuffled, uint64_t seed, int64_t whole_max,
                      int64_t piece);
  LoaderState state() const override { return state_; }
  void set_state(const LoaderState& s) override;
  const DocumentSet& documents() const { return *docs_; }

 protected:
  // The sequence at the current state, moving to the next epoch first when this one is done and
  // `may_start_epoch`; false when the epoch is done and it may not.
  bool current(SequenceRef& seq, bool may_start_epoch);
  void advance(const SequenceRef& seq);

  std::shared_ptr<const DocumentSet> docs_;

 private:
  bool shuffled_;
  uint64_t seed_;
  int64_t whole_max_, piece_;
  LoaderState state_;
  std::vector<int64_t> perm_;
  int64_t perm_epoch_ = -1;
  int64_t doc_at(int64_t position);
};

class PackedSource : public DocumentBatchSource {
 public:
  // budget = B·T tokens per micro-batch; T and n_positions set the sequence rule above.
  PackedSource(std::shared_ptr<const DocumentSet> docs, int B, int T, int n_positions, bool shuffled, uint64_t seed);
  void next(Batch& batch) override;

 private:
  int64_t budget_;
};

class PaddedSource : public DocumentBatchSource {
 public:
  PaddedSource(std::shared_ptr<const DocumentSet> docs, int B, int T, int n_positions, bool shuffled, uint64_t seed);
  void next(Batch& batch) override;

 private:
  int B_, T_;
};

}  // namespace kiln
