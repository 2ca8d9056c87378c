// A small vision transformer classifier from the same modules (nn/block.h: pre-norm LayerNorm blocks, non-causal
// attention, GELU MLP), used to judge generated images:
//   patchify (as the DiT, models/dit.h) -> linear to D + fixed 2-D sin-cos positions -> depth blocks ->
//   LayerNorm -> mean over tokens (the features) -> linear head -> softmax cross-entropy.
// Forward and backward sit side by side in vit.cpp. On the CPU (fp32 activations) or the GPU backend (bf16).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "models/dit.h"
#include "models/param_table.h"
#include "nn/block.h"
#include "nn/workspace.h"

namespace kiln {

struct ViTConfig {
  int image_size = 28, channels = 1, patch = 4;
  int hidden = 96, depth = 4, heads = 4, mlp_ratio = 4;
  int classes = 10;
  DiTConfig layout() const;  // the patch geometry in DiT terms (for patchify and the positions)
  void validate() const;
  std::string to_json() const;
  static ViTConfig from_json(const std::string& text, const std::string& where);
};

ParamTable vit_param_table(const ViTConfig& c);

class ViT {
 public:
  ViT(const ViTConfig& cfg, nn::Backend& be, bool with_grads = true);
  ~ViT();
  const ViTConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }
  float* params() { return params_.as<float>(); }
  float* grads() { return grads_.as<float>(); }
  // The 16-bit weight copy of a lowp backend (as the DiT's, models/dit.h); params_changed() refreshes it.
  uint16_t* params16() { return params16_.as<uint16_t>(); }
  void params_changed();
  void init_random(uint64_t seed);  // Xavier-uniform matrices, zero biases, unit norm gains
  void zero_grad();
  size_t plan(int B);
  // images [B, C, H, W] -> logits [B, classes] (host); features [B, D] (host, may be null): the pooled
  // representation. With labels (training), returns the mean cross-entropy and keeps the logits' gradient for
  // backward(); without, returns 0.
  double forward(float* logits, float* features, const float* images, const int32_t* labels, int B);
  void backward();
  // Label smoothing ε of the training loss: targets (1 − ε)·onehot + ε/classes (0: plain cross-entropy).
  void set_label_smoothing(float eps) { smoothing_ = eps; }

 private:
  float smoothing_ = 0;
  void carve(nn::Workspace& ws, int B);
  ViTConfig cfg_;
  nn::Backend& be_;
  ParamTable table_;
  bool with_grads_;
  nn::DeviceBlock params_, grads_, params16_;
  nn::Weight patch_, head_;
  nn::Norm norm_;
  std::vector<nn::Block> blocks_;
  nn::Workspace ws_;
  int planned_ = 0, B_ = 0;
  nn::Act patches_, lnf_, pooled_, logits_, dpooled_, dlnf_, dop_;
  float *pos_ = nullptr, *meanf_ = nullptr, *rstdf_ = nullptr, *losses_ = nullptr, *dres_ = nullptr;
  int32_t* targets_ = nullptr;
  std::vector<float*> xs_;
  std::vector<nn::BlockActivations> acts_;
  nn::BlockScratch scratch_;
  std::vector<float> host_;
};

}  // namespace kiln
