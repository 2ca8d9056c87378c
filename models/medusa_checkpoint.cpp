#include "models/medusa_checkpoint.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"

namespace kiln {

namespace {
std::string tensor_name(int k, const char* part) { return "medusa." + std::to_string(k) + "." + part; }

std::string checkpoint_dir(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return path;
  const std::string d = std::filesystem::path(path).parent_path().string();
  return d.empty() ? "." : d;
}
}  // namespace

nn::MedusaShape medusa_shape(const ModelConfig& cfg, int K) {
  nn::MedusaShape s;
  s.K = K;
  s.C = cfg.d_model;
  s.V = cfg.vocab_size;
  return s;
}

ParamTable medusa_param_table(const nn::MedusaShape& s) {
  ParamTable t;
  // Packed: the table's offsets are exactly MedusaShape's (no alignment padding between tensors).
  for (int k = 0; k < s.K; k++) {
    t.add(tensor_name(k, "res.weight"), "medusa." + std::to_string(k) + ".res.weight", Shape{s.C, s.C}, k > 0);
    t.add(tensor_name(k, "res.bias"), "medusa." + std::to_string(k) + ".res.bias", Shape{s.C}, true);
    t.add(tensor_name(k, "head.weight"), "medusa." + std::to_string(k) + ".head.weight", Shape{s.V, s.C}, true);
  }
  KILN_CHECK(s.K == 0 || t.specs.back().offset + size_t(t.specs.back().numel()) == size_t(s.total()),
             "medusa: the parameter table's layout differs from the heads' block");
  return t;
}

const float* lm_head_matrix(const ModelConfig& cfg, const ParamTable& t, const float* params) {
  const ParamSpec* head = t.find_key("output.weight");
  if (!head) head = &t.get_key("token_embd.weight");  // tied
  KILN_CHECK(head->shape.numel() == int64_t(cfg.vocab_size) * cfg.d_model, "medusa: the LM head ", head->name,
             " is not [vocab_size, d_model]");
  return params + head->offset;
}

void save_medusa_heads(const std::string& dir, const nn::MedusaShape& s, const float* params) {
  std::vector<Tensor> ts;
  for (int k = 0; k < s.K; k++) {
    ts.push_back({tensor_name(k, "res.weight"), DType::F32, Shape{s.C, s.C}, const_cast<float*>(params + s.w_off(k))});
    ts.push_back({tensor_name(k, "res.bias"), DType::F32, Shape{s.C}, const_cast<float*>(params + s.b_off(k))});
    ts.push_back({tensor_name(k, "head.weight"), DType::F32, Shape{s.V, s.C}, const_cast<float*>(params + s.h_off(k))});
  }
  write_safetensors(dir + "/medusa.safetensors", ts, {{"format", "pt"}, {"medusa_num_heads", std::to_string(s.K)}});
  const std::string cfg_path = dir + "/config.json";
  nlohmann::json j = nlohmann::json::parse(read_file(cfg_path), nullptr, false);
  KILN_CHECK(j.is_object(), cfg_path, ": not a JSON object");
  j["medusa_num_heads"] = s.K;
  write_file_atomic(cfg_path, j.dump(2) + "\n");
}

std::optional<MedusaWeights> load_medusa_heads(const std::string& path, const ModelConfig& cfg) {
  const std::string dir = checkpoint_dir(path);
  const std::string file = dir + "/medusa.safetensors";
  std::error_code ec;
  if (!std::filesystem::exists(file, ec)) return std::nullopt;
  SafeTensorsReader r(file);
  int K = 0;
  while (r.find(tensor_name(K, "head.weight"))) K++;
  KILN_CHECK(K > 0, file, ": no tensor medusa.0.head.weight");
  const auto it = r.metadata().find("medusa_num_heads");
  KILN_CHECK(it == r.metadata().end() || it->second == std::to_string(K), file, ": medusa_num_heads ", it->second,
             " but ", K, " heads stored");
  MedusaWeights w;
  w.shape = medusa_shape(cfg, K);
  w.params.resize(size_t(w.shape.total()));
  auto get = [&](int k, const char* part, Shape want, int64_t off) {
    const Tensor& t = r.get(tensor_name(k, part));
    KILN_CHECK(t.shape.numel() == want.numel() && t.shape == want, file, ": tensor ", tensor_name(k, part),
               " has the wrong shape for d_model ", cfg.d_model, " and vocab_size ", cfg.vocab_size);
    KILN_CHECK(t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16, file, ": tensor ",
               tensor_name(k, part), " is not F32, BF16 or F16");
    convert_to_f32(t.data, t.dtype, w.params.data() + off, size_t(want.numel()));
  };
  for (int k = 0; k < K; k++) {
    get(k, "res.weight", Shape{cfg.d_model, cfg.d_model}, w.shape.w_off(k));
    get(k, "res.bias", Shape{cfg.d_model}, w.shape.b_off(k));
    get(k, "head.weight", Shape{cfg.vocab_size, cfg.d_model}, w.shape.h_off(k));
  }
  return w;
}

}  // namespace kiln
