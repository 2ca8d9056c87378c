// A model family: how one Hugging Face model_type's config.json maps onto ModelConfig and back, and what its
// checkpoints call each tensor. The architecture itself (which modules, in which order) is the Transformer's
// composition (models/transformer.h) chosen by ModelConfig's fields, so a family file is short: its config
// parser, its writer, its weight-name map. models/families/*.cpp hold one each.
#pragma once
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "models/model_config.h"
#include "models/param_table.h"

namespace kiln {

struct Family {
  const char* model_type;    // "llama"
  const char* architecture;  // "LlamaForCausalLM"
  // config.json (already parsed) -> ModelConfig; throws naming `where` and the field.
  ModelConfig (*parse)(const nlohmann::json& j, const std::string& where);
  // ModelConfig -> the family's config.json fields (the caller adds what the source file had beside them).
  nlohmann::json (*to_json)(const ModelConfig& c);
  // Canonical key ("blk.3.attn_q.weight") -> the name in the family's checkpoints.
  std::string (*file_name)(const std::string& key);
  // Tensors the family's files hold twice where kiln keeps one (null: none): pairs (the copy's file name, the
  // canonical key of the tensor it repeats). The loader compares each copy present with that tensor (a one-line
  // warning when they differ; kiln uses the tensor, not the copy); the saver writes the copies back.
  std::vector<std::pair<std::string, std::string>> (*copies)(const ModelConfig& c) = nullptr;
};

// The families kiln knows; find_family fails with one line naming `where` and the known model types.
const std::vector<const Family*>& families();
const Family& find_family(const std::string& model_type, const std::string& where);

// config.json text -> ModelConfig (dispatching on model_type; a file without one that has GPT-2's keys is
// GPT-2, as kiln's first checkpoints were written). The source text is kept so writing it back preserves the
// fields kiln does not use.
ModelConfig parse_model_config(const std::string& text, const std::string& where);
// A config.json path, or a directory holding one.
ModelConfig load_model_config(const std::string& path);
// The family's config.json for cfg.
std::string model_config_json(const ModelConfig& cfg);

// A family's weight-name map from two tables: whole keys (`top`: "token_embd.weight" -> "transformer.wte.weight")
// and block parts (`part`: blk.N.<part>.<suffix> -> <layer_prefix>N.<name>.<suffix>). Throws naming `family`
// and the key when neither table has it.
using NamePairs = std::initializer_list<std::pair<const char*, const char*>>;
std::string map_tensor_name(const std::string& key, NamePairs top, NamePairs part, const char* layer_prefix,
                            const char* family);

// Every tensor the composition needs for cfg, in block order, named by the family.
ParamTable model_param_table(const ModelConfig& cfg);

}  // namespace kiln
