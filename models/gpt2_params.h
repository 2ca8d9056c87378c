// The GPT-2 parameter table: every tensor's Hugging Face name, shape and place in one contiguous block.
// Parameters, gradients and the two AdamW moments are four blocks with this same layout, so the
// optimizer and the gradient norm run over flat arrays and checkpoints map names to offsets.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"
#include "models/config.h"

namespace kiln {

struct ParamSpec {
  std::string name;   // Hugging Face GPT2LMHeadModel name, e.g. "transformer.h.0.attn.c_attn.weight"
  Shape shape;        // Hugging Face layout (Conv1D weights are [in, out])
  bool decay = false; // weight decay applies: tensors with two or more dimensions
  size_t offset = 0;  // in floats, from the start of the block; 16-float aligned
  int64_t numel() const { return shape.numel(); }
};

struct ParamTable {
  std::vector<ParamSpec> specs;
  size_t total = 0;  // floats in the block, including alignment padding

  static ParamTable gpt2(const GPT2Config& c);
  const ParamSpec* find(const std::string& name) const;
};

// Pointers into one block (parameters, or gradients, or a moment) for one transformer layer.
struct LayerParams {
  float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *attn_proj_w, *attn_proj_b;
  float *ln2_w, *ln2_b, *fc_w, *fc_b, *fc_proj_w, *fc_proj_b;
};
struct GPT2Params {
  float *wte, *wpe;
  std::vector<LayerParams> layers;
  float *lnf_w, *lnf_b;
  static GPT2Params bind(const ParamTable& table, float* block, int n_layer);
};

}  // namespace kiln
