// Narrow copies of a decoder's weight matrices (kernels/narrow_gemv.h): every linear layer and the LM head is
// converted once, when the decoder is built, and its nn::Weight points at the copy, which the backend's products
// read instead of the fp32 matrix (embeddings, norms and biases stay fp32). On a device backend the copies are
// made on the host and moved to the device (upload); the host then keeps none.
#pragma once
#include <vector>

#include "core/memory.h"
#include "kernels/narrow_gemv.h"
#include "nn/backend.h"
#include "nn/workspace.h"

namespace kiln {

struct TransformerWeights;

class NarrowWeights {
 public:
  // The matrices convert() turns narrow, in its order: every linear layer that is present (an MoE layer has no
  // dense FFN; its shared expert, when it has one, is one; the routed experts' stacked matrices stay fp32), then
  // the head.
  static std::vector<nn::Weight*> matrices(TransformerWeights& w);
  // Converts each matrix of w (fp32 on the host) to format f and points it at the copy (f32: nothing).
  void convert(TransformerWeights& w, WeightFormat f);
  // Moves the copies to be's memory and points dst's matrices (the same model bound to that device) at them.
  void upload(nn::Backend& be, TransformerWeights& dst);
  size_t bytes() const { return bytes_; }
  // The products' scratch for calls of up to `rows` rows (q8_0 on a device quantizes x there).
  void plan(nn::OpScratch& s, int64_t rows) const;

 private:
  std::vector<Buffer> storage_;
  std::vector<nn::DeviceBlock> device_;
  std::vector<NarrowMatrix> mats_;  // sized once, so the Weights' pointers stay put
  size_t bytes_ = 0;
};

}  // namespace kiln
