// A training micro-batch as the model consumes it, and the interface every data source implements.
//
// Fixed rows: B rows of T tokens, positions 0..T-1, cu_seqlens empty.
// Packed:     n_tokens tokens holding whole documents back to back; cu_seqlens[s]..cu_seqlens[s+1] is
//             document s, positions restart at 0 in each, and attention never crosses a boundary.
// targets[i] < 0 means "no loss here" (the last token of a document, a prompt token in supervised
// data, padding).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/attention.h"

namespace kiln {

struct Batch {
  int B = 0, T = 0;                // fixed rows (B·T = n_tokens), or B=1, T=n_tokens when packed
  int64_t n_tokens = 0;
  std::vector<int32_t> tokens, targets, pos;
  std::vector<int32_t> cu_seqlens;  // packed only: [num_seqs + 1]

  int64_t count_targets() const {
    int64_t n = 0;
    for (int64_t i = 0; i < n_tokens; i++) n += targets[size_t(i)] >= 0;
    return n;
  }
  // The model's attention parameters (base: heads, scale, window) for this batch's rows or packed sequences.
  AttentionParams attention(AttentionParams ap) const {
    ap.B = B;
    ap.T = T;
    if (!cu_seqlens.empty()) {
      ap.cu_seqlens = cu_seqlens.data();
      ap.num_seqs = int(cu_seqlens.size()) - 1;
    }
    return ap;
  }
  void resize(int64_t n) {
    n_tokens = n;
    tokens.resize(size_t(n));
    targets.resize(size_t(n));
    pos.resize(size_t(n));
  }
};

// Where the data position lives; saved in checkpoints so a resumed run sees the same batches.
struct LoaderState {
  int64_t epoch = 0;
  int64_t shard = 0;     // current shard (sequential) or unused
  int64_t position = 0;  // token position (sequential), next window or document (shuffled, packed)
};

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Fills the next micro-batch (at most B·T tokens) and advances.
  virtual void next(Batch& batch) = 0;
  virtual LoaderState state() const = 0;
  virtual void set_state(const LoaderState& s) = 0;
  void reset() { set_state(LoaderState{}); }
};

}  // namespace kiln
