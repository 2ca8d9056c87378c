#include "models/gpt2_params.h"

#include "core/error.h"

namespace kiln {

GPT2Params GPT2Params::bind(const ParamTable& t, float* block, int n_layer) {
  KILN_CHECK(t.specs.size() == size_t(12 * n_layer + 4), "GPT-2 parameter table has ", t.specs.size(),
             " tensors, expected ", 12 * n_layer + 4);
  GPT2Params p;
  size_t i = 0;
  auto next = [&]() { return block + t.specs[i++].offset; };
  p.wte = next();
  p.wpe = next();
  p.layers.resize(n_layer);
  for (auto& L : p.layers) {
    L.ln1_w = next(); L.ln1_b = next(); L.qkv_w = next(); L.qkv_b = next();
    L.attn_proj_w = next(); L.attn_proj_b = next(); L.ln2_w = next(); L.ln2_b = next();
    L.fc_w = next(); L.fc_b = next(); L.fc_proj_w = next(); L.fc_proj_b = next();
  }
  p.lnf_w = next();
  p.lnf_b = next();
  return p;
}

}  // namespace kiln
