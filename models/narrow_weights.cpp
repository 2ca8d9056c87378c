#include "models/narrow_weights.h"

#include "models/transformer.h"

namespace kiln {

void NarrowWeights::convert(TransformerWeights& w, WeightFormat f) {
  if (f == WeightFormat::F32) return;
  std::vector<nn::Weight*> all;
  // Every linear layer that is present (an MoE layer has no dense FFN; its shared expert, when it has one, is
  // one; the routed experts' stacked matrices stay fp32).
  for (nn::Block& b : w.blocks)
    for (nn::Weight* x : {&b.attn.qkv, &b.attn.proj, &b.ffn.up, &b.ffn.down, &b.moe.shared.up, &b.moe.shared.down})
      if (x->w && x->in > 0 && x->out > 0) all.push_back(x);
  all.push_back(&w.head);
  mats_.resize(all.size());
  storage_.resize(all.size());
  for (size_t i = 0; i < all.size(); i++) {
    nn::Weight& x = *all[i];
    // The narrow matrix is [out, in]; a Conv1D weight ([in, out]) is transposed as it is converted.
    storage_[i].resize(narrow_bytes(f, x.out, x.in));
    bytes_ += storage_[i].size();
    mats_[i] = narrow_convert(storage_[i].data(), f, x.w, x.out, x.in, x.layout == nn::Layout::InOut);
    x.narrow = &mats_[i];
  }
}

}  // namespace kiln
