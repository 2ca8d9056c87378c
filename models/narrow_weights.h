// Narrow copies of a decoder's weight matrices (kernels/narrow_gemv.h): every linear layer and the LM head is
// converted once, when the decoder is built, and its nn::Weight points at the copy, which the backend's products
// read instead of the fp32 matrix (embeddings, norms and biases stay fp32). CPU decoders only.
#pragma once
#include <vector>

#include "core/memory.h"
#include "kernels/narrow_gemv.h"
#include "nn/backend.h"

namespace kiln {

struct TransformerWeights;

class NarrowWeights {
 public:
  // Converts each matrix of w to format f and points it at the copy (f32: nothing). The copies live here.
  void convert(TransformerWeights& w, WeightFormat f);
  size_t bytes() const { return bytes_; }

 private:
  std::vector<Buffer> storage_;
  std::vector<NarrowMatrix> mats_;  // sized once, so the Weights' pointers stay put
  size_t bytes_ = 0;
};

}  // namespace kiln
