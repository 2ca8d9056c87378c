// The key/value cache of a decoder: for every layer, the keys and the values of every position already
// run through the model, laid out [layer][batch][position][C] (C = n_head·head_dim, heads side by side as
// the fused QKV projection produces them), so a new position's K and V are one contiguous row each and a
// head's keys are read with stride C by kernels/decode_attention.h.
#pragma once
#include <cstdint>

#include "core/memory.h"

namespace kiln {

class KVCache {
 public:
  KVCache() = default;
  KVCache(int n_layer, int batch, int max_positions, int C)
      : n_layer_(n_layer), batch_(batch), max_pos_(max_positions), C_(C),
        k_(bytes_per_tensor(n_layer, batch, max_positions, C)), v_(bytes_per_tensor(n_layer, batch, max_positions, C)) {}

  // The K (or V) row of (layer, sequence b, position pos).
  float* k(int layer, int b = 0, int pos = 0) { return k_.f32() + offset(layer, b, pos); }
  float* v(int layer, int b = 0, int pos = 0) { return v_.f32() + offset(layer, b, pos); }
  const float* k(int layer, int b = 0, int pos = 0) const { return k_.f32() + offset(layer, b, pos); }
  const float* v(int layer, int b = 0, int pos = 0) const { return v_.f32() + offset(layer, b, pos); }

  int64_t batch_stride() const { return int64_t(max_pos_) * C_; }  // floats between sequences
  int64_t position_stride() const { return C_; }                     // floats between positions
  int n_layer() const { return n_layer_; }
  int batch() const { return batch_; }
  int max_positions() const { return max_pos_; }
  size_t bytes() const { return k_.size() + v_.size(); }

 private:
  int n_layer_ = 0, batch_ = 0, max_pos_ = 0, C_ = 0;
  Buffer k_, v_;
  static size_t bytes_per_tensor(int L, int B, int P, int C) { return size_t(L) * B * P * C * sizeof(float); }
  int64_t offset(int layer, int b, int pos) const {
    return ((int64_t(layer) * batch_ + b) * max_pos_ + pos) * C_;
  }
};

}  // namespace kiln
