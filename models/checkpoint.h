// GPT-2 weights on disk, in the layout of a Hugging Face GPT2LMHeadModel checkpoint directory:
//   config.json         models/config.h
//   model.safetensors   every parameter under its HF name ("transformer.h.0.attn.c_attn.weight", Conv1D
//                       weights [in, out]); lm_head.weight is left out because it is tied to wte.
// So a directory written here loads with GPT2LMHeadModel.from_pretrained, and one downloaded from the
// Hugging Face hub (openai-community/gpt2 and its fine-tunes) loads here.
#pragma once
#include <string>

#include "core/dtype.h"
#include "models/config.h"
#include "models/gpt2_params.h"

namespace kiln {

// Writes dir/model.safetensors (metadata {"format": "pt"}) and then dir/config.json, each atomically,
// creating dir if needed. on_disk: F32, BF16 or F16 (converted with round-to-nearest-even).
// Throws kiln::Error naming the directory if it cannot be created or written; files already there
// stay whole.
void save_gpt2_checkpoint(const std::string& dir, const GPT2Config& cfg, const ParamTable& table, const float* params,
                          DType on_disk);

// The config.json for a checkpoint: `path` is a checkpoint directory, a config.json, or a .safetensors
// file (whose directory holds config.json).
GPT2Config load_gpt2_config_for(const std::string& path);

// Fills the parameter block (table.total floats; alignment padding is zeroed) from `path`, a checkpoint
// directory (reads model.safetensors) or a .safetensors file. Accepts F32, BF16 and F16 on disk, names
// with or without the "transformer." prefix, and skips what is not a parameter: the attention-mask
// buffers h.N.attn.bias / h.N.attn.masked_bias and the tied lm_head.weight. A missing tensor, a wrong
// shape or dtype, or an unexpected tensor throws kiln::Error naming the file and tensor.
void load_gpt2_weights(const std::string& path, const GPT2Config& cfg, const ParamTable& table, float* params);

// The safetensors file `path` refers to (dir/model.safetensors for a directory).
std::string gpt2_weights_file(const std::string& path);

}  // namespace kiln
