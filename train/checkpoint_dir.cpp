#include "train/checkpoint_dir.h"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateFile = "train_state.safetensors";

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08ld", long(step));
  return buf;
}

Tensor flat(const char* name, float* data, size_t n) {
  Tensor t;
  t.name = name;
  t.dtype = DType::F32;
  t.shape = Shape{int64_t(n)};
  t.data = data;
  return t;
}

int64_t meta_int(const std::map<std::string, std::string>& m, const std::string& key, const std::string& file) {
  auto it = m.find(key);
  KILN_CHECK(it != m.end(), file, ": metadata field ", key, " is missing");
  try {
    size_t used = 0;
    long long v = std::stoll(it->second, &used);
    KILN_CHECK(used == it->second.size(), file, ": metadata field ", key, " is not an integer");
    return v;
  } catch (const std::logic_error&) {
    fail(file, ": metadata field ", key, " is not an integer ('", it->second, "')");
  }
}

}  // namespace

std::string latest_checkpoint(const std::string& out) {
  fs::path link = fs::path(out) / "latest";
  std::error_code ec;
  if (!fs::is_symlink(link, ec) && !fs::is_directory(link, ec)) return "";
  fs::path target = fs::is_symlink(link, ec) ? fs::read_symlink(link, ec) : fs::path("latest");
  if (ec) return "";
  fs::path dir = target.is_absolute() ? target : fs::path(out) / target;
  return fs::is_directory(dir) ? dir.string() : "";
}

std::string save_training_checkpoint(const std::string& out, Model& model, AdamW& opt, const TrainState& state,
                                     const std::string& save_dtype, const std::string& tokenizer_dir, int keep,
                                     size_t max_shard_bytes) {
  const std::string name = step_name(state.step);
  const std::string dir = (fs::path(out) / name).string();
  make_dirs(dir);
  save_model_checkpoint(dir, model.config(), model.table(), model.host_params(),
                        save_dtype == "bf16" ? DType::BF16 : DType::F32, max_shard_bytes);

  std::vector<Tensor> tensors = {flat("adamw.exp_avg", opt.m(), opt.num_floats()),
                                 flat("adamw.exp_avg_sq", opt.v(), opt.num_floats())};
  // With bf16 weights on disk the exact fp32 master weights travel in the state file.
  if (save_dtype == "bf16") tensors.push_back(flat("master_weights", model.host_params(), model.table().total));
  std::map<std::string, std::string> meta = {
      {"format", "kiln-train-state-1"},
      {"step", std::to_string(state.step)},
      {"seed", std::to_string(state.seed)},
      {"loader_epoch", std::to_string(state.loader.epoch)},
      {"loader_shard", std::to_string(state.loader.shard)},
      {"loader_position", std::to_string(state.loader.position)},
      {"last_loss", str(state.last_loss)},
      {"num_floats", std::to_string(model.table().total)},
      {"optimizer_steps", std::to_string(state.optimizer_steps)},
      {"loss_scale", str(state.loss_scale)},
      {"loss_scale_clean", std::to_string(state.loss_scale_clean)},
      {"skipped_steps", std::to_string(state.skipped_steps)},
  };
  // Test hook: die between the weights and the state file, to show `latest` still names a whole checkpoint.
  if (const char* k = std::getenv("KILN_TEST_KILL_IN_SAVE"); k && std::atoll(k) == state.step) std::raise(SIGKILL);
  write_safetensors((fs::path(dir) / kStateFile).string(), tensors, meta);

  if (!tokenizer_dir.empty())
    for (const char* f : {"encoder.json", "vocab.bpe", "tokenizer.json", "tokenizer_config.json"}) {
      fs::path src = fs::path(tokenizer_dir) / f;
      if (fs::exists(src)) write_file_atomic((fs::path(dir) / f).string(), read_file(src.string()));
    }

  // Move `latest` only now that the checkpoint is complete: symlink under a temporary name, then rename.
  const std::string tmp = (fs::path(out) / ".latest.tmp").string();
  ::unlink(tmp.c_str());
  KILN_CHECK(::symlink(name.c_str(), tmp.c_str()) == 0, tmp, ": cannot create symlink");
  KILN_CHECK(std::rename(tmp.c_str(), (fs::path(out) / "latest").c_str()) == 0, out, "/latest: cannot update");

  if (keep > 0) {
    std::vector<std::string> steps;
    for (auto& e : fs::directory_iterator(out)) {
      std::string n = e.path().filename().string();
      if (e.is_directory() && n.rfind("step_", 0) == 0 && n.size() == 13) steps.push_back(n);
    }
    std::sort(steps.begin(), steps.end());
    for (size_t i = 0; i + size_t(keep) < steps.size(); i++)
      if (steps[i] != name) fs::remove_all(fs::path(out) / steps[i]);
  }
  return dir;
}

TrainState load_training_checkpoint(const std::string& dir, Model& model, AdamW& opt) {
  const std::string file = (fs::path(dir) / kStateFile).string();
  SafeTensorsReader r(file);
  auto meta = r.metadata();
  KILN_CHECK(meta["format"] == "kiln-train-state-1", file, ": not a kiln training state file");
  KILN_CHECK(meta_int(meta, "num_floats", file) == int64_t(model.table().total), file,
             ": optimizer state does not match the model's parameter count");
  TrainState st;
  st.step = meta_int(meta, "step", file);
  st.seed = uint64_t(meta_int(meta, "seed", file));
  st.loader.epoch = meta_int(meta, "loader_epoch", file);
  st.loader.shard = meta_int(meta, "loader_shard", file);
  st.loader.position = meta_int(meta, "loader_position", file);
  st.last_loss = std::stod(meta.count("last_loss") ? meta["last_loss"] : "0");
  st.optimizer_steps = meta_int(meta, "optimizer_steps", file);
  st.loss_scale = std::stof(meta.count("loss_scale") ? meta["loss_scale"] : "1");
  st.loss_scale_clean = meta_int(meta, "loss_scale_clean", file);
  st.skipped_steps = meta_int(meta, "skipped_steps", file);

  auto copy = [&](const char* name, float* dst) {
    const Tensor* t = r.find(name);
    KILN_CHECK(t, file, ": tensor ", name, " is missing");
    KILN_CHECK(t->dtype == DType::F32 && size_t(t->numel()) == model.table().total, file, ": tensor ", name,
               " has the wrong type or size");
    std::copy_n(static_cast<const float*>(t->data), model.table().total, dst);
  };
  copy("adamw.exp_avg", opt.m());
  copy("adamw.exp_avg_sq", opt.v());
  if (r.find("master_weights"))
    copy("master_weights", model.host_params());
  else
    load_model_weights(dir, model.config(), model.table(), model.host_params());
  return st;
}

}  // namespace kiln
