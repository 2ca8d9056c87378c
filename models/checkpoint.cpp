#include "models/checkpoint.h"

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "transformer.";

void check_table(const GPT2Config& cfg, const ParamTable& table, const std::string& where) {
  KILN_CHECK(table.specs.size() == size_t(12 * cfg.n_layer + 4), where, ": parameter table has ", table.specs.size(),
             " tensors but the config has ", cfg.n_layer, " layers");
}

// The original GPT-2 files carry the causal-mask buffers of the old GPT2Attention module:
// "h.<digits>.attn.bias" and "h.<digits>.attn.masked_bias".
bool is_attention_buffer(const std::string& name) {
  if (name.rfind("h.", 0) != 0) return false;
  size_t i = 2;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') i++;
  if (i == 2) return false;
  std::string rest = name.substr(i);
  return rest == ".attn.bias" || rest == ".attn.masked_bias";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); i++) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace

void save_gpt2_checkpoint(const std::string& dir, const GPT2Config& cfg, const ParamTable& table, const float* params,
                          DType on_disk) {
  cfg.validate(dir);
  check_table(cfg, table, dir);
  KILN_CHECK(on_disk == DType::F32 || on_disk == DType::BF16 || on_disk == DType::F16, dir,
             ": checkpoints are written as F32, BF16 or F16, not ", dtype_name(on_disk));
  make_dirs(dir);
  std::vector<Tensor> tensors;
  tensors.reserve(table.specs.size());
  for (const auto& s : table.specs)
    tensors.push_back(Tensor{s.name, DType::F32, s.shape, const_cast<float*>(params + s.offset)});
  // Weights first: if they cannot be written (disk full, killed), config.json still describes the
  // weights already there. Each file is replaced by a rename, so neither is ever half-written.
  write_safetensors_converted((fs::path(dir) / "model.safetensors").string(), tensors, on_disk, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), cfg.to_json());
}

std::string gpt2_weights_file(const std::string& path) {
  if (fs::is_directory(path)) {
    std::string file = (fs::path(path) / "model.safetensors").string();
    KILN_CHECK(fs::exists(file), path, ": no model.safetensors in this directory");
    return file;
  }
  KILN_CHECK(fs::exists(path), path, ": no such file or directory");
  return path;
}

GPT2Config load_gpt2_config_for(const std::string& path) {
  if (fs::is_directory(path)) return GPT2Config::load(path);
  KILN_CHECK(fs::exists(path), path, ": no such file or directory");
  if (fs::path(path).extension() == ".json") return GPT2Config::load(path);
  fs::path dir = fs::path(path).parent_path();
  std::string config = ((dir.empty() ? fs::path(".") : dir) / "config.json").string();
  KILN_CHECK(fs::exists(config), path, ": no config.json beside the weights (looked for ", config, ")");
  return GPT2Config::load(config);
}

void load_gpt2_weights(const std::string& path, const GPT2Config& cfg, const ParamTable& table, float* params) {
  const std::string file = gpt2_weights_file(path);
  check_table(cfg, table, file);
  SafeTensorsReader reader(file);
  std::vector<const SafeTensorsEntry*> found(table.specs.size(), nullptr);
  for (const auto& e : reader.entries()) {
    const bool prefixed = e.name.rfind(kPrefix, 0) == 0;
    const std::string bare = prefixed ? e.name.substr(std::strlen(kPrefix)) : e.name;
    if (e.name == "lm_head.weight" || is_attention_buffer(bare)) continue;
    const ParamSpec* spec = table.find(kPrefix + bare);
    KILN_CHECK(spec, file, ": unexpected tensor ", quote_name(e.name), " (not a parameter of a GPT-2 with ",
               cfg.n_layer, " layers)");
    const size_t i = size_t(spec - table.specs.data());
    KILN_CHECK(!found[i], file, ": tensor ", quote_name(spec->name), " appears twice (as ",
               quote_name(found[i] ? found[i]->name : ""), " and ", quote_name(e.name), ")");
    found[i] = &e;
  }
  for (size_t i = 0; i < table.specs.size(); i++) {
    const ParamSpec& s = table.specs[i];
    const SafeTensorsEntry* e = found[i];
    KILN_CHECK(e, file, ": missing tensor ", quote_name(s.name));
    KILN_CHECK(e->dtype == "F32" || e->dtype == "BF16" || e->dtype == "F16", file, ": tensor ", quote_name(e->name),
               " has dtype ", e->dtype, "; weights must be F32, BF16 or F16");
    KILN_CHECK(e->shape == s.shape.vec(), file, ": tensor ", quote_name(e->name), " has shape ", shape_str(e->shape),
               " but the config (n_embd ", cfg.n_embd, ", vocab_size ", cfg.vocab_size, ", n_positions ",
               cfg.n_positions, ") needs ", s.shape.str());
  }
  // Everything is checked before the block is touched, so a bad file leaves the parameters as they were.
  for (size_t i = 0; i < table.specs.size(); i++) {
    const ParamSpec& s = table.specs[i];
    const SafeTensorsEntry& e = *found[i];
    const DType dt = e.dtype == "F32" ? DType::F32 : e.dtype == "BF16" ? DType::BF16 : DType::F16;
    convert_to_f32(e.bytes, dt, params + s.offset, size_t(s.numel()));
    size_t end = i + 1 < table.specs.size() ? table.specs[i + 1].offset : table.total;
    std::fill(params + s.offset + size_t(s.numel()), params + end, 0.0f);
  }
  std::fill(params, params + (table.specs.empty() ? table.total : table.specs[0].offset), 0.0f);
}

}  // namespace kiln
