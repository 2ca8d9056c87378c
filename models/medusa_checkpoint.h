// Medusa heads (nn/medusa.h) in a checkpoint directory, beside the base model's files:
//   medusa.safetensors   medusa.K.res.weight [C, C], medusa.K.res.bias [C], medusa.K.head.weight [V, C]
//                        for heads K = 0 .. n-1 (nn.Linear layout, f32)
//   config.json          gains "medusa_num_heads": n (the key Medusa's own configs use)
// A directory without medusa.safetensors has no heads; the base loads as before either way.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "models/model_config.h"
#include "models/param_table.h"
#include "nn/medusa.h"

namespace kiln {

// The heads' parameter table (the block layout of nn::MedusaShape, with file names), for the optimizer.
ParamTable medusa_param_table(const nn::MedusaShape& s);
// The shape of K heads on a base config.
nn::MedusaShape medusa_shape(const ModelConfig& cfg, int K);
// The base's LM head [V, C] in a parameter block of its table (the token embedding when tied).
const float* lm_head_matrix(const ModelConfig& cfg, const ParamTable& t, const float* params);

// Writes dir/medusa.safetensors and adds medusa_num_heads to dir/config.json (both atomically); dir must hold a
// base checkpoint already.
void save_medusa_heads(const std::string& dir, const nn::MedusaShape& s, const float* params);
// The heads of a checkpoint directory (or of the directory of a .safetensors file), if it has them: every
// tensor checked against the base config (one line naming the file and tensor otherwise).
struct MedusaWeights {
  nn::MedusaShape shape;
  std::vector<float> params;  // [shape.total()]
};
std::optional<MedusaWeights> load_medusa_heads(const std::string& path, const ModelConfig& cfg);

}  // namespace kiln
