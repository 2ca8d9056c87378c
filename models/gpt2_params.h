// Pointers into one GPT-2 parameter block (parameters, or gradients, or a moment), in the order of
// model_param_table for a gpt2 ModelConfig: what the GPU model (models/gpt2_cuda.h) binds its kernels to.
#pragma once
#include <vector>

#include "models/param_table.h"

namespace kiln {

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
