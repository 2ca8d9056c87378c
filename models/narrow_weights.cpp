#include "models/narrow_weights.h"

#include <algorithm>

#include "models/transformer.h"

namespace kiln {

std::vector<nn::Weight*> NarrowWeights::matrices(TransformerWeights& w) {
  std::vector<nn::Weight*> all;
  // Presence by shape, not by pointer: a device binding has no fp32 matrix for these (upload).
  for (nn::Block& b : w.blocks)
    for (nn::Weight* x : {&b.attn.qkv, &b.attn.proj, &b.ffn.up, &b.ffn.down, &b.moe.shared.up, &b.moe.shared.down})
      if (x->in > 0 && x->out > 0) all.push_back(x);
  all.push_back(&w.head);
  return all;
}

void NarrowWeights::convert(TransformerWeights& w, WeightFormat f) {
  if (f == WeightFormat::F32) return;
  const std::vector<nn::Weight*> all = matrices(w);
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

void NarrowWeights::upload(nn::Backend& be, TransformerWeights& dst) {
  const std::vector<nn::Weight*> all = matrices(dst);
  KILN_CHECK(all.size() == mats_.size(), "narrow weights: ", mats_.size(), " converted matrices for a model of ",
             all.size());
  device_.clear();
  device_.reserve(mats_.size());
  for (size_t i = 0; i < mats_.size(); i++) {
    device_.emplace_back(be, storage_[i].size(), "narrow weights");
    be.upload(device_[i].data(), storage_[i].data(), storage_[i].size());
    // The same arrays at the same offsets within the device's copy.
    const char* h = static_cast<const char*>(storage_[i].data());
    char* d = device_[i].as<char>();
    NarrowMatrix& m = mats_[i];
    m.q = d + (static_cast<const char*>(m.q) - h);
    if (m.d) m.d = reinterpret_cast<const uint16_t*>(d + (reinterpret_cast<const char*>(m.d) - h));
    all[i]->narrow = &m;
    storage_[i].resize(0);
  }
}

void NarrowWeights::plan(nn::OpScratch& s, int64_t rows) const {
  for (const NarrowMatrix& m : mats_)
    if (m.fmt == WeightFormat::Q8_0) {
      s.narrow_rows = std::max(s.narrow_rows, rows);
      s.narrow_in = std::max(s.narrow_in, int(m.K));
    }
}

}  // namespace kiln
