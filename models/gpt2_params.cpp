#include "models/gpt2_params.h"

namespace kiln {

ParamTable ParamTable::gpt2(const GPT2Config& c) {
  ParamTable t;
  const int64_t C = c.n_embd, V = c.vocab_size;
  auto add = [&](const std::string& name, Shape shape) {
    ParamSpec s{name, shape, shape.ndim >= 2, t.total};
    t.total += (size_t(shape.numel()) + 15) / 16 * 16;
    t.specs.push_back(std::move(s));
  };
  add("transformer.wte.weight", {V, C});
  add("transformer.wpe.weight", {c.n_positions, C});
  for (int l = 0; l < c.n_layer; l++) {
    std::string p = "transformer.h." + std::to_string(l) + ".";
    add(p + "ln_1.weight", {C});
    add(p + "ln_1.bias", {C});
    add(p + "attn.c_attn.weight", {C, 3 * C});
    add(p + "attn.c_attn.bias", {3 * C});
    add(p + "attn.c_proj.weight", {C, C});
    add(p + "attn.c_proj.bias", {C});
    add(p + "ln_2.weight", {C});
    add(p + "ln_2.bias", {C});
    add(p + "mlp.c_fc.weight", {C, 4 * C});
    add(p + "mlp.c_fc.bias", {4 * C});
    add(p + "mlp.c_proj.weight", {4 * C, C});
    add(p + "mlp.c_proj.bias", {C});
  }
  add("transformer.ln_f.weight", {C});
  add("transformer.ln_f.bias", {C});
  return t;
}

const ParamSpec* ParamTable::find(const std::string& name) const {
  for (const auto& s : specs)
    if (s.name == name) return &s;
  return nullptr;
}

GPT2Params GPT2Params::bind(const ParamTable& t, float* block, int n_layer) {
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
