// The decoder's Medusa support (infer/medusa.h): a candidate tree in one pass with tree attention
// (kernels/decode_attention.h; on the GPU the masks are uploaded for the CUDA kernel), the accepted path's cache
// entries compacted in place, and the final norm's output rows as host fp32 for the heads.
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "models/transformer.h"

namespace kiln {

const float* TransformerDecoder::hidden() const {
  if (be_->on_host()) {
    KILN_CHECK(ln_.dtype == DType::F32, "decoder: hidden states are read on the CPU in fp32");
    return static_cast<const float*>(ln_.p);
  }
  // A device decoder: the rows of the last head's input, brought back and widened from bf16.
  const size_t n = size_t(hidden_rows_) * size_t(cfg_.d_model);
  KILN_CHECK(ln_.dtype == DType::BF16, "decoder: the GPU's hidden states are bf16");
  hidden16_.resize(n);
  be_->download(hidden16_.data(), ln_.p, n * sizeof(uint16_t));
  hidden_host_.resize(n);
  for (size_t i = 0; i < n; i++) hidden_host_[i] = bf16_to_f32(hidden16_[i]);
  return hidden_host_.data();
}

const float* TransformerDecoder::forward_tree(const int32_t* tokens, int n, const int32_t* depth,
                                              const uint64_t* tree) {
  KILN_CHECK(batch_ == 1, "decoder: tree attention runs with batch 1");
  KILN_CHECK(!cfg_.mla.on(), "decoder: tree attention is not written for latent attention (", cfg_.family, ")");
  KILN_CHECK(n >= 1 && n <= 64, "decoder: a tree has 1 to 64 nodes, got ", n);
  KILN_CHECK(length_ > 0, "decoder: a tree continues a prompt (the cache is empty)");
  KILN_CHECK(int64_t(length_) + n <= max_pos_, "decoder: ", length_, " cached + ", n,
             " tree nodes exceed the context of ", max_pos_, " positions");
  for (int i = 0; i < n; i++)
    KILN_CHECK(depth[i] >= 0 && depth[i] <= i && ((tree[i] >> i) & 1) && (tree[i] >> i) == 1,
               "decoder: tree node ", i, " has a bad depth or mask (a node sees itself and earlier nodes only)");
  mtp_forget(length_);  // the nodes' hidden states are not kept: the MTP draft needs a plain forward after this
  const int V = cfg_.vocab_size;
  ensure_rows(n);
  inputs_.resize(size_t(2 * n + 1));
  stage_inputs(inputs_.data(), tokens, n, n);
  for (int i = 0; i < n; i++) inputs_[size_t(n + i)] = length_ + depth[i];  // a node's position is its depth's
  const int32_t* tok =
      static_cast<const int32_t*>(be_->from_host(inputs_d_, inputs_.data(), inputs_.size() * sizeof(int32_t)));
  // The masks where the attention kernel reads them (a device decoder: its own copy).
  if (!be_->on_host() && !tree_d_.data()) tree_d_ = nn::DeviceBlock(*be_, 64 * sizeof(uint64_t), "tree masks");
  tree_ = static_cast<const uint64_t*>(be_->from_host(tree_d_.data(), tree, size_t(n) * sizeof(uint64_t)));
  run_layers(tok, tok + n, tok + 2 * n, n);
  tree_ = nullptr;
  length_ += n;
  const size_t bytes = sizeof(float) * size_t(n) * V;
  if (all_d_.size() < bytes) all_d_ = nn::DeviceBlock(*be_, bytes, "decoder logits");
  lm_head(x_, n, all_d_.as<float>());
  hidden_rows_ = n;
  if (!be_->on_host()) {
    logits_.resize(bytes / sizeof(float));
    return static_cast<const float*>(be_->to_host(logits_.data(), all_d_.data(), bytes));
  }
  return all_d_.as<float>();
}

void TransformerDecoder::keep_path(int base, const int32_t* nodes, int m) {
  KILN_CHECK(batch_ == 1, "decoder: keep_path runs with batch 1");
  KILN_CHECK(base >= 0 && m >= 0 && base + m <= length_, "decoder: keep_path of ", m, " nodes past ", base,
             " in a cache of ", length_);
  const int64_t W = cache_width();
  const size_t row = size_t(W) * dtype_size(be_->act_dtype());
  const int64_t layer_cache = int64_t(max_pos_) * W;
  char* k = static_cast<char*>(k_.data());
  char* v = static_cast<char*>(v_.data());
  for (int i = 0; i < m; i++) {
    KILN_CHECK(nodes[i] >= i && base + nodes[i] < length_ && (i == 0 || nodes[i] > nodes[i - 1]),
               "decoder: keep_path's nodes must increase within the tree");
    if (nodes[i] == i) continue;
    if (!be_->on_host()) {  // a device cache: one row per layer and tensor, in order on the stream
      const nn::Act K{k_.data(), be_->act_dtype()}, Vc{v_.data(), be_->act_dtype()};
      for (int l = 0; l < cfg_.n_layer; l++) {
        const int64_t dst = l * layer_cache + int64_t(base + i) * W, src = l * layer_cache + int64_t(base + nodes[i]) * W;
        be_->copy_rows(K.at(dst), W, K.at(src), W, 1, W);
        if (v) be_->copy_rows(Vc.at(dst), W, Vc.at(src), W, 1, W);
      }
      continue;
    }
    for (int l = 0; l < cfg_.n_layer; l++) {
      const size_t dst = size_t(l * layer_cache + int64_t(base + i) * W) * dtype_size(be_->act_dtype());
      const size_t src = size_t(l * layer_cache + int64_t(base + nodes[i]) * W) * dtype_size(be_->act_dtype());
      std::memmove(k + dst, k + src, row);
      if (v) std::memmove(v + dst, v + src, row);
    }
  }
  length_ = base + m;
}

}  // namespace kiln
