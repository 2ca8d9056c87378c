#include "models/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"
#include "models/family.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

// Buffers some checkpoints carry that are not parameters: GPT-2's causal masks "h.N.attn.bias" /
// "h.N.attn.masked_bias" (old GPT2Attention) and the rotary "...rotary_emb.inv_freq" of older Llama files.
bool is_buffer(const std::string& name) {
  const auto ends = [&](const char* s) {
    const size_t k = std::strlen(s);
    return name.size() >= k && name.compare(name.size() - k, k, s) == 0;
  };
  if (ends("rotary_emb.inv_freq")) return true;
  std::string bare = name.rfind("transformer.", 0) == 0 ? name.substr(12) : name;
  if (bare.rfind("h.", 0) != 0) return false;
  size_t i = 2;
  while (i < bare.size() && bare[i] >= '0' && bare[i] <= '9') i++;
  if (i == 2) return false;
  const std::string rest = bare.substr(i);
  return rest == ".attn.bias" || rest == ".attn.masked_bias";
}

// The safetensors files of a checkpoint: one file, or the shards of an index.
std::vector<std::string> weight_files(const std::string& path) {
  if (!fs::is_directory(path)) {
    KILN_CHECK(fs::exists(path), path, ": no such file or directory");
    return {path};
  }
  const fs::path single = fs::path(path) / "model.safetensors", index = fs::path(path) / "model.safetensors.index.json";
  if (fs::exists(single)) return {single.string()};
  KILN_CHECK(fs::exists(index), path, ": no model.safetensors or model.safetensors.index.json in this directory");
  std::vector<std::string> files;
  for (const IndexShard& s : parse_safetensors_index(read_file(index.string()), index.string())) {
    const std::string full = (fs::path(path) / s.file).string();
    KILN_CHECK(fs::exists(full), index.string(), ": shard ", quote_name(s.file), " (for ", quote_name(s.first_tensor),
               ") does not exist");
    files.push_back(full);
  }
  return files;
}

}  // namespace

namespace {

bool is_shard_name(const std::string& f) {
  // model-00001-of-00003.safetensors
  return f.size() == 32 && f.rfind("model-", 0) == 0 && f.compare(11, 4, "-of-") == 0 &&
         f.compare(20, 12, ".safetensors") == 0 &&
         std::all_of(f.begin() + 6, f.begin() + 11, ::isdigit) && std::all_of(f.begin() + 15, f.begin() + 20, ::isdigit);
}

// After a save: the other form, and shards the new save does not use, would shadow or confuse the new files.
void remove_stale(const fs::path& dir, bool sharded, const std::vector<std::string>& keep) {
  std::error_code ec;
  if (sharded) {
    fs::remove(dir / "model.safetensors", ec);
  } else {
    fs::remove(dir / "model.safetensors.index.json", ec);
  }
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string f = e.path().filename().string();
    if (is_shard_name(f) && std::find(keep.begin(), keep.end(), f) == keep.end()) fs::remove(e.path(), ec);
  }
}

}  // namespace

size_t parse_byte_size(const std::string& text, const std::string& what) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) digits++;
  const std::string unit = text.substr(digits);
  static const std::pair<const char*, double> units[] = {{"", 1},          {"B", 1},          {"KB", 1e3},
                                                         {"MB", 1e6},      {"GB", 1e9},       {"TB", 1e12},
                                                         {"KiB", 1024.0},  {"MiB", 1048576.0}, {"GiB", 1073741824.0}};
  KILN_CHECK(digits > 0 && digits <= 15, what, ": expected a size such as 5GB, 500MB or a byte count, got '", text, "'");
  for (const auto& [u, mult] : units)
    if (unit == u) return size_t(double(std::stoull(text.substr(0, digits))) * mult);
  fail(what, ": unknown unit '", unit, "' in '", text, "' (B, KB, MB, GB, TB, KiB, MiB, GiB)");
}

std::vector<IndexShard> parse_safetensors_index(const std::string& text, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": malformed JSON (", e.what(), ")");
  }
  KILN_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), where,
             ": expected an object with a \"weight_map\" object");
  std::vector<IndexShard> shards;
  for (auto& [name, file] : j["weight_map"].items()) {
    KILN_CHECK(file.is_string(), where, ": weight_map[", quote_name(name), "] must be a file name");
    const std::string f = file.get<std::string>();
    KILN_CHECK(!f.empty() && f.find('/') == std::string::npos && f.find('\0') == std::string::npos && f != "." &&
                   f != "..",
               where, ": weight_map[",
               quote_name(name), "] names ", quote_name(f), ", not a file in the directory");
    const bool seen = std::any_of(shards.begin(), shards.end(), [&](const IndexShard& s) { return s.file == f; });
    if (!seen) shards.push_back({f, name});
  }
  KILN_CHECK(!shards.empty(), where, ": weight_map is empty");
  return shards;
}

void save_model_checkpoint(const std::string& dir, const ModelConfig& cfg, const ParamTable& table,
                           const float* params, DType on_disk, size_t max_shard_bytes) {
  cfg.validate(dir);
  KILN_CHECK(on_disk == DType::F32 || on_disk == DType::BF16 || on_disk == DType::F16, dir,
             ": checkpoints are written as F32, BF16 or F16, not ", dtype_name(on_disk));
  make_dirs(dir);
  std::vector<Tensor> tensors;
  size_t total = 0;
  for (const FileTensor& s : table.file_tensors()) {
    tensors.push_back(Tensor{s.name, DType::F32, s.shape, const_cast<float*>(params + s.offset)});
    total += size_t(s.shape.numel()) * dtype_size(on_disk);
  }
  // The family's copies (DeepSeek-V3's MTP embedding/head) under their own names, so its loaders find them.
  const Family& family = find_family(cfg.family, dir);
  if (family.copies)
    for (const auto& [name, key] : family.copies(cfg)) {
      const ParamSpec* s = table.find_key(key);
      KILN_CHECK(s, dir, ": the copy ", quote_name(name), " repeats ", key, ", which this model does not have");
      tensors.push_back(Tensor{name, DType::F32, s->shape, const_cast<float*>(params + s->offset)});
      total += size_t(s->shape.numel()) * dtype_size(on_disk);
    }
  // Weights first: if they cannot be written (disk full, killed), config.json still describes the weights
  // already there. Each file is replaced by a rename, so none is ever half-written.
  const fs::path d(dir);
  if (max_shard_bytes == 0 || total <= max_shard_bytes) {
    write_safetensors_converted((d / "model.safetensors").string(), tensors, on_disk, {{"format", "pt"}});
    remove_stale(d, false, {});
  } else {
    std::vector<std::vector<Tensor>> shards(1);
    size_t bytes = 0;
    for (const Tensor& t : tensors) {
      const size_t b = size_t(t.shape.numel()) * dtype_size(on_disk);
      if (!shards.back().empty() && bytes + b > max_shard_bytes) shards.emplace_back(), bytes = 0;
      shards.back().push_back(t);
      bytes += b;
    }
    char name[40];
    std::vector<std::string> files;
    nlohmann::ordered_json map = nlohmann::ordered_json::object();
    for (size_t i = 0; i < shards.size(); i++) {
      std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
      files.push_back(name);
      write_safetensors_converted((d / name).string(), shards[i], on_disk, {{"format", "pt"}});
      for (const Tensor& t : shards[i]) map[t.name] = name;
    }
    nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
    write_file_atomic((d / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    remove_stale(d, true, files);
  }
  write_file_atomic((d / "config.json").string(), model_config_json(cfg));
}

ModelConfig load_model_config_for(const std::string& path) {
  if (fs::is_directory(path)) return load_model_config(path);
  KILN_CHECK(fs::exists(path), path, ": no such file or directory");
  if (fs::path(path).extension() == ".json") return load_model_config(path);
  const fs::path dir = fs::path(path).parent_path();
  const std::string config = ((dir.empty() ? fs::path(".") : dir) / "config.json").string();
  KILN_CHECK(fs::exists(config), path, ": no config.json beside the weights (looked for ", config, ")");
  return load_model_config(config);
}

void load_model_weights(const std::string& path, const ModelConfig& cfg, const ParamTable& table, float* params) {
  std::vector<std::unique_ptr<SafeTensorsReader>> readers;
  for (const std::string& f : weight_files(path)) readers.push_back(std::make_unique<SafeTensorsReader>(f));
  const bool gpt2 = cfg.family == "gpt2";
  const Family& family = find_family(cfg.family, path);
  // The files' view of the table: stacked experts are one tensor per expert there.
  const std::vector<FileTensor> want = table.file_tensors();
  std::vector<const SafeTensorsEntry*> found(want.size(), nullptr);
  std::vector<const std::string*> found_in(want.size(), nullptr);
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < want.size(); i++) index[want[i].name] = i;
  // The family's copies present in the files: compared with the tensor they repeat once that is loaded.
  std::map<std::string, std::string> copy_of;
  if (family.copies)
    for (const auto& [name, key] : family.copies(cfg)) copy_of[name] = key;
  std::vector<std::pair<const SafeTensorsEntry*, const std::string*>> copies_found;
  for (const auto& r : readers) {
    for (const auto& e : r->entries()) {
      if (is_buffer(e.name) || (cfg.tie_embeddings && e.name == "lm_head.weight")) continue;
      if (copy_of.count(e.name)) {
        copies_found.emplace_back(&e, &r->path());
        continue;
      }
      // Original OpenAI GPT-2 files have no "transformer." prefix.
      const std::string name = gpt2 && e.name.rfind("transformer.", 0) != 0 ? "transformer." + e.name : e.name;
      auto it = index.find(name);
      KILN_CHECK(it != index.end(), r->path(), ": unexpected tensor ", quote_name(e.name), " (not a parameter of this ",
                 cfg.family, " model with ", cfg.n_layer, " layers)");
      const size_t i = it->second;
      KILN_CHECK(!found[i], r->path(), ": tensor ", quote_name(want[i].name), " appears twice (as ",
                 quote_name(found[i]->name), " in ", *found_in[i], " and ", quote_name(e.name), ")");
      found[i] = &e;
      found_in[i] = &r->path();
    }
  }
  for (size_t i = 0; i < want.size(); i++) {
    const FileTensor& s = want[i];
    const SafeTensorsEntry* e = found[i];
    KILN_CHECK(e, readers.size() == 1 ? readers[0]->path() : path, ": missing tensor ", quote_name(s.name));
    KILN_CHECK(e->dtype == "F32" || e->dtype == "BF16" || e->dtype == "F16", *found_in[i], ": tensor ",
               quote_name(e->name), " has dtype ", e->dtype, "; weights must be F32, BF16 or F16");
    KILN_CHECK(e->shape == s.shape.vec(), *found_in[i], ": tensor ", quote_name(e->name), " has shape ",
               shape_str(e->shape), " but the config (hidden ", cfg.d_model, ", vocab ", cfg.vocab_size, ", heads ",
               cfg.n_head, "/", cfg.n_kv_head, " of ", cfg.head_dim, ", ffn ", cfg.d_ff, ") needs ", s.shape.str());
  }
  // Everything is checked before the block is touched, so a bad file leaves the parameters as they were.
  std::fill(params, params + table.total, 0.0f);
  for (size_t i = 0; i < want.size(); i++) {
    const FileTensor& s = want[i];
    const SafeTensorsEntry& e = *found[i];
    const DType dt = e.dtype == "F32" ? DType::F32 : e.dtype == "BF16" ? DType::BF16 : DType::F16;
    convert_to_f32(e.bytes, dt, params + s.offset, size_t(s.shape.numel()));
  }
  for (const auto& [e, file] : copies_found) {
    const std::string& key = copy_of.at(e->name);
    const ParamSpec* s = table.find_key(key);
    KILN_CHECK(s, *file, ": tensor ", quote_name(e->name), " repeats ", key, ", which this model does not have");
    KILN_CHECK(e->shape == s->shape.vec() && (e->dtype == "F32" || e->dtype == "BF16" || e->dtype == "F16"), *file,
               ": tensor ", quote_name(e->name), " (", e->dtype, " ", shape_str(e->shape), ") cannot be a copy of ",
               quote_name(family.file_name(key)), " (", s->shape.str(), ")");
    std::vector<float> v(size_t(s->shape.numel()));
    convert_to_f32(e->bytes, e->dtype == "F32" ? DType::F32 : e->dtype == "BF16" ? DType::BF16 : DType::F16, v.data(),
                   v.size());
    double worst = 0;
    for (size_t j = 0; j < v.size(); j++) worst = std::max(worst, double(std::fabs(v[j] - params[s->offset + j])));
    if (worst > 0)
      std::fprintf(stderr, "kiln: warning: %s: %s differs from %s (max |difference| %.3g); the model uses %s\n",
                   file->c_str(), quote_name(e->name).c_str(), quote_name(family.file_name(key)).c_str(), worst,
                   quote_name(family.file_name(key)).c_str());
  }
}

}  // namespace kiln
