// The image training loop (train/diffusion_trainer.h).
#include "train/diffusion_trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/gpu.h"
#include "core/safetensors.h"
#include "train/checkpoint_dir.h"
#include "train/images.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// The model for --model (a preset, a config.json or a directory with one; the data's geometry); it must denoise.
std::unique_ptr<ImageModel> make_denoiser(const TrainOptions& opt, const ImageSet& data, const ImageModelOptions& mo) {
  KILN_CHECK(data.height == data.width, "images: ", data.height, "x", data.width, " images are not square");
  KILN_CHECK(!opt.model.empty(), "--model: give a DiT preset (DiT-S/2, DiT-S/4, DiT-B/2, DiT-B/4) or a config.json");
  const ImageGeometry g{data.height, data.channels, data.classes};
  auto m = make_image_model(image_model_config(opt.model, ImageTask::Denoise, &g), "--model " + opt.model, mo);
  KILN_CHECK(m->provides(ImageTask::Denoise), "--model ", opt.model, ": a ", m->type(),
             " model is not a denoiser (the diffusion objectives need one, e.g. DiT-S/2)");
  return m;
}

std::vector<Tensor> tensors_of(const ParamTable& t, float* block) {
  std::vector<Tensor> ts;
  for (const ParamSpec& s : t.specs) ts.push_back({s.name, DType::F32, s.shape, block + s.offset});
  return ts;
}

void read_into(const std::string& path, const ParamTable& t, float* block) {
  SafeTensorsReader r(path);
  for (const ParamSpec& s : t.specs) {
    const Tensor& x = r.get(s.name);
    KILN_CHECK(x.numel() == s.numel(), path, ": tensor ", s.name, " has ", x.numel(), " values, the model ",
               s.numel());
    convert_to_f32(x.data, x.dtype, block + s.offset, size_t(s.numel()));
  }
}

std::string config_json(const ImageModel& m, const ImageTrainOptions& img) {
  nlohmann::json j = nlohmann::json::parse(m.config_json());
  j["objective"] = img.objective, j["flow_t"] = img.flow_t, j["label_dropout"] = img.label_dropout;
  return j.dump(2) + "\n";
}

struct ImageBatch {
  std::vector<float> x0, eps, net_in, c_noise, F, dF;
  std::vector<double> levels;
  std::vector<int32_t> labels;
};

// One batch drawn from the generator: indices, label drops, levels, noise (in this order).
void draw(ImageBatch& b, const ImageSet& data, const Objective& o, float drop, int B, Rng& r) {
  const int64_t P = data.pixels();
  b.x0.resize(size_t(B * P)), b.eps.resize(size_t(B * P)), b.net_in.resize(size_t(B * P));
  b.F.resize(size_t(B * P)), b.dF.resize(size_t(B * P));
  b.c_noise.resize(size_t(B)), b.levels.resize(size_t(B)), b.labels.resize(size_t(B));
  for (int i = 0; i < B; i++) {
    const int64_t k = int64_t(r.below(uint64_t(data.size())));
    std::copy_n(data.images.data() + k * P, P, b.x0.data() + i * P);
    b.labels[size_t(i)] = data.labels[size_t(k)];
  }
  for (int i = 0; i < B; i++)
    if (r.uniform() < drop) b.labels[size_t(i)] = data.classes;
  for (int i = 0; i < B; i++) b.levels[size_t(i)] = o.sample_level(r);
  for (auto& e : b.eps) e = r.normal();
  objective_inputs(o, b.x0.data(), b.eps.data(), b.levels.data(), B, P, b.net_in.data(), b.c_noise.data());
}

}  // namespace

ImageModelOptions image_model_options(const TrainOptions& opt) {
  KILN_CHECK(opt.dtype == "fp32" || opt.dtype == "bf16", "--dtype ", opt.dtype, ": image models train in fp32 or "
             "bf16 (fp16 would need loss scaling)");
  ImageModelOptions mo;
  if (opt.dtype == "bf16") mo.lowp = LowpType::BF16;
  const DeviceSpec device = parse_device(opt.device);
  if (device.cuda) {
    // As the language-model trainer: the GPU backend's activations and products are bf16.
    KILN_CHECK(opt.dtype == "bf16", "--device cuda trains in bf16: pass --dtype bf16 (got --dtype ", opt.dtype, ")");
    gpu::init(device.index);
    mo.cuda = true;
  }
  return mo;
}

ImageModelFiles find_image_model(const std::string& path) {
  ImageModelFiles f;
  f.dir = path;
  if (!file_exists((fs::path(path) / "config.json").string())) {
    const std::string l = latest_checkpoint(path);
    KILN_CHECK(!l.empty(), "--model ", path, ": no config.json and no latest checkpoint");
    f.dir = l;
  }
  const std::string cp = (fs::path(f.dir) / "config.json").string();
  const std::string text = read_file(cp);
  f.config_json = text;
  const nlohmann::json j = nlohmann::json::parse(text);
  KILN_CHECK(j.contains("objective") && j["objective"].is_string(), cp, ": no \"objective\" (not an image model "
             "trained by kiln train --objective)");
  f.objective = Objective::make(j["objective"].get<std::string>(), j.value("flow_t", "uniform"));
  f.label_dropout = j.value("label_dropout", 0.0f);
  return f;
}

std::unique_ptr<ImageModel> load_image_model(const ImageModelFiles& f, const ImageModelOptions& opt, bool ema) {
  auto m = make_image_model(f.config_json, (fs::path(f.dir) / "config.json").string(), opt);
  std::string p = (fs::path(f.dir) / "ema.safetensors").string();
  if (!ema || !file_exists(p)) p = (fs::path(f.dir) / "model.safetensors").string();
  read_into(p, m->table(), m->host_params());
  m->params_changed();
  return m;
}

double train_images(const TrainOptions& opt, const ImageTrainOptions& img) {
  set_threads(opt.threads);
  const Objective obj = Objective::make(img.objective, img.flow_t);
  KILN_CHECK(img.ema_decay >= 0 && img.ema_decay < 1, "--ema-decay ", img.ema_decay, ": must be in [0, 1)");
  KILN_CHECK(img.label_dropout >= 0 && img.label_dropout <= 1, "--label-dropout ", img.label_dropout,
             ": must be in [0, 1]");
  KILN_CHECK(opt.batch > 0 && opt.grad_accum > 0 && opt.steps >= 0, "--batch, --grad-accum must be positive and "
             "--steps non-negative");
  const ImageModelOptions mo = image_model_options(opt);
  const ImageSet data = load_images(opt.data, "train");
  ImageSet val;
  if (!opt.val_data.empty())
    val = load_images(opt.val_data, "val");
  else if (has_image_split(opt.data, "val"))
    val = load_images(opt.data, "val");
  std::unique_ptr<ImageModel> mp = make_denoiser(opt, data, mo);
  ImageModel& model = *mp;
  const int64_t P = data.pixels();
  model.init_random(opt.seed);
  model.plan(opt.batch, RecomputePolicy::parse(opt.recompute));
  const ParamTable& table = model.table();
  AdamW adam(table, opt.adamw, model.blocks().backend);
  model.ema_reset();
  std::vector<float>& ema = model.ema();
  LrSchedule sched;
  sched.kind = LrSchedule::parse(opt.lr_schedule);
  sched.lr = opt.lr, sched.min_lr = opt.min_lr, sched.warmup = opt.warmup, sched.total = opt.steps;
  Rng rng(opt.seed);
  int64_t step = 0;

  if (opt.resume) {
    KILN_CHECK(!opt.out.empty(), "--resume needs --out");
    const std::string dir = latest_checkpoint(opt.out);
    KILN_CHECK(!dir.empty(), "--resume: no checkpoint in ", opt.out);
    read_into((fs::path(dir) / "model.safetensors").string(), table, model.host_params());
    model.params_changed();
    read_into((fs::path(dir) / "ema.safetensors").string(), table, ema.data());
    SafeTensorsReader st((fs::path(dir) / "train_state.safetensors").string());
    convert_to_f32(st.get("adam.m").data, DType::F32, adam.m(), table.total);
    convert_to_f32(st.get("adam.v").data, DType::F32, adam.v(), table.total);
    adam.moments_changed();
    auto meta = [&](const char* k) {
      auto it = st.metadata().find(k);
      KILN_CHECK(it != st.metadata().end(), dir, "/train_state.safetensors: metadata ", k, " missing");
      return std::stoull(it->second);
    };
    step = int64_t(meta("step"));
    rng = Rng(meta("rng_seed"), meta("rng_position"));
    std::fprintf(stderr, "resumed from %s at step %ld\n", dir.c_str(), long(step));
  }

  auto save = [&](int64_t s) {
    if (opt.out.empty()) return;
    make_dirs(opt.out);
    char name[32];
    std::snprintf(name, sizeof name, "step_%08ld", long(s));
    const fs::path dir = fs::path(opt.out) / name;
    make_dirs(dir.string());
    write_file_atomic((dir / "config.json").string(), config_json(model, img));
    model.sync_to_host();
    adam.sync_to_host();
    write_safetensors((dir / "model.safetensors").string(), tensors_of(table, model.host_params()));
    write_safetensors((dir / "ema.safetensors").string(), tensors_of(table, ema.data()));
    const int64_t n = int64_t(table.total);
    write_safetensors((dir / "train_state.safetensors").string(),
                      {{"adam.m", DType::F32, Shape{n}, adam.m()}, {"adam.v", DType::F32, Shape{n}, adam.v()}},
                      {{"step", std::to_string(s)}, {"rng_seed", std::to_string(rng.seed())},
                       {"rng_position", std::to_string(rng.position())}});
    const std::string tmp = (fs::path(opt.out) / ".latest.tmp").string();
    fs::remove(tmp);
    KILN_CHECK(::symlink(name, tmp.c_str()) == 0, tmp, ": cannot create symlink");
    KILN_CHECK(std::rename(tmp.c_str(), (fs::path(opt.out) / "latest").c_str()) == 0, opt.out,
               "/latest: cannot update");
    // Older step directories beyond keep_checkpoints.
    if (opt.keep_checkpoints > 0) {
      std::vector<std::string> steps;
      for (auto& e : fs::directory_iterator(opt.out))
        if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0)
          steps.push_back(e.path().string());
      std::sort(steps.begin(), steps.end());
      for (size_t i = 0; i + size_t(opt.keep_checkpoints) < steps.size(); i++) fs::remove_all(steps[i]);
    }
  };

  // Validation: a fixed generator, the same batches every time.
  auto validate = [&]() {
    if (val.size() == 0) return std::nan("");
    Rng vr(opt.seed ^ 0x5eed5eedull);
    ImageBatch vb;
    double sum = 0;
    for (int i = 0; i < opt.val_batches; i++) {
      draw(vb, val, obj, 0.0f, opt.batch, vr);
      model.denoise(vb.F.data(), vb.net_in.data(), vb.c_noise.data(), vb.labels.data(), opt.batch);
      sum += objective_loss(obj, vb.x0.data(), vb.eps.data(), vb.levels.data(), vb.F.data(), opt.batch, P, nullptr);
    }
    return sum / opt.val_batches;
  };

  std::FILE* metrics = nullptr;
  if (!opt.metrics.empty()) {
    metrics = std::fopen(opt.metrics.c_str(), opt.resume ? "a" : "w");
    KILN_CHECK(metrics, "--metrics ", opt.metrics, ": cannot open for writing");
  }
  const bool tty = opt.progress && isatty(2);
  ImageBatch b;
  double last = 0;
  const auto t_start = Clock::now();
  for (; step < opt.steps; step++) {
    const auto t0 = Clock::now();
    double loss = 0;
    for (int m = 0; m < opt.grad_accum; m++) {
      draw(b, data, obj, img.label_dropout, opt.batch, rng);
      model.denoise(b.F.data(), b.net_in.data(), b.c_noise.data(), b.labels.data(), opt.batch);
      loss += objective_loss(obj, b.x0.data(), b.eps.data(), b.levels.data(), b.F.data(), opt.batch, P, b.dF.data()) /
              opt.grad_accum;
      for (auto& g : b.dF) g /= float(opt.grad_accum);
      model.denoise_backward(b.dF.data());
    }
    KILN_CHECK(std::isfinite(loss), "step ", step + 1, ": the loss is ", loss);
    const float lr = sched.at(int(step));
    const ParamBlocks pb = model.blocks();
    const double norm = adam.grad_norm(pb);
    adam.update(pb, lr, step + 1, norm, 1.0f, /*zero_grads=*/true);
    model.ema_update(img.ema_decay);
    last = loss;
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    nlohmann::json j = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"step_seconds", secs}};
    if (opt.eval_every > 0 && (step + 1) % opt.eval_every == 0) j["val_loss"] = validate();
    if (metrics) std::fprintf(metrics, "%s\n", j.dump().c_str()), std::fflush(metrics);
    if (tty)
      std::fprintf(stderr, "\rstep %ld/%d loss %.4f lr %.2e %.2fs/step", long(step + 1), opt.steps, loss, lr, secs);
    if (opt.save_every > 0 && (step + 1) % opt.save_every == 0 && step + 1 < opt.steps) save(step + 1);
  }
  if (tty) std::fprintf(stderr, "\n");
  if (metrics) std::fclose(metrics);
  save(step);
  const double total = std::chrono::duration<double>(Clock::now() - t_start).count();
  nlohmann::json summary = {{"objective", img.objective}, {"steps", step}, {"loss", last}, {"seconds", total},
                            {"param_floats", table.total}};
  if (val.size() > 0) summary["val_loss"] = validate();
  std::printf("%s\n", summary.dump().c_str());
  return last;
}

}  // namespace kiln
