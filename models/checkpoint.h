// Model weights on disk, as Hugging Face checkpoint directories of each family:
//   config.json                     the family's config (models/family.h)
//   model.safetensors               every parameter under its file name (GPT-2: "transformer.h.0.attn.c_attn.weight",
//                                   Conv1D [in, out]; Llama family: "model.layers.0.self_attn.q_proj.weight",
//                                   nn.Linear [out, in]); a tied lm_head.weight is left out
//   or model.safetensors.index.json {"weight_map": {name: shard file}} with the shards beside it
// So a directory written here loads with *ForCausalLM.from_pretrained, and one downloaded from the Hugging Face
// hub loads here.
#pragma once
#include <string>
#include <vector>

#include "core/dtype.h"
#include "models/family.h"
#include "models/model_config.h"
#include "models/param_table.h"

namespace kiln {

// Writes dir/model.safetensors (metadata {"format": "pt"}) and then dir/config.json, each atomically, creating
// dir if needed. on_disk: F32, BF16 or F16 (converted with round-to-nearest-even). With max_shard_bytes > 0 and
// more weight bytes than that, writes Hugging Face's sharded form instead: model-00001-of-0000N.safetensors, each
// at most max_shard_bytes (a larger tensor gets a shard of its own), in table order, then
// model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}). The form not written (and shards of
// an earlier save that the new index does not name) is removed once the new files are complete. Throws
// kiln::Error naming the directory if it cannot be created or written; files already there stay whole.
void save_model_checkpoint(const std::string& dir, const ModelConfig& cfg, const ParamTable& table,
                           const float* params, DType on_disk, size_t max_shard_bytes = 0);

// "5GB", "500MB", "2GiB", "64KB", "1000" (bytes) -> bytes, as Hugging Face's max_shard_size reads them (GB = 10^9,
// GiB = 2^30); "0" means no sharding. Throws naming `what` for anything else.
size_t parse_byte_size(const std::string& text, const std::string& what);

// The config for a checkpoint: `path` is a checkpoint directory, a config.json, or a .safetensors file (whose
// directory holds config.json).
ModelConfig load_model_config_for(const std::string& path);

// Fills the parameter block (table.total floats; padding is zeroed) from `path`: a checkpoint directory (its
// model.safetensors, or the shards its model.safetensors.index.json names) or one .safetensors file. Accepts
// F32, BF16 and F16, and skips what is not a parameter (GPT-2's attention-mask buffers, rotary inv_freq
// buffers, a tied lm_head.weight); GPT-2 names may lack the "transformer." prefix. A missing, duplicated,
// unexpected or misshaped tensor, or an index naming a missing file, throws kiln::Error naming the file and
// tensor; the block is untouched then.
// The shards a model.safetensors.index.json names (text: the file's contents, where: its path for errors), each
// once, in order of first use, with the first tensor mapped to it. Malformed JSON, a missing or non-object
// weight_map, an empty map, or a value that is not a plain file name in the same directory throws kiln::Error
// naming `where`. load_model_weights reads indices with it.
struct IndexShard {
  std::string file;          // as written: a file name beside the index
  std::string first_tensor;  // the first tensor mapped to it (for messages)
};
std::vector<IndexShard> parse_safetensors_index(const std::string& text, const std::string& where);

void load_model_weights(const std::string& path, const ModelConfig& cfg, const ParamTable& table, float* params);

}  // namespace kiln
