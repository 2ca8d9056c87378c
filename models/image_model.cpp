// The image-model interface (models/image_model.h): the default task methods, the EMA copy, the families'
// table with the DiT and ViT adapters, and the config resolution for --model.
#include "models/image_model.h"

#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/gpu.h"
#include "models/dit.h"
#include "models/realnvp.h"
#include "models/realnvp_image.h"
#include "models/vit.h"

namespace kiln {

namespace fs = std::filesystem;

const char* image_task_name(ImageTask t) {
  switch (t) {
    case ImageTask::Denoise: return "denoise";
    case ImageTask::Classify: return "classify";
    case ImageTask::Density: return "density";
  }
  return "?";
}

void ImageModel::unsupported(ImageTask t) const {
  fail("a ", type(), " model does not provide the ", image_task_name(t), " task");
}
void ImageModel::denoise(float*, const float*, const float*, const int32_t*, int) { unsupported(ImageTask::Denoise); }
void ImageModel::denoise_backward(const float*) { unsupported(ImageTask::Denoise); }
void ImageModel::denoise_vjp(float*, const float*) { unsupported(ImageTask::Denoise); }
double ImageModel::loss_forward(const float*, const int32_t*, int, bool) { unsupported(ImageTask::Classify); }
void ImageModel::loss_backward() { unsupported(ImageTask::Classify); }
void ImageModel::predict(float*, float*, const float*, int) { unsupported(ImageTask::Classify); }
void ImageModel::generate(float*, const float*, const int32_t*, int) { unsupported(ImageTask::Density); }

void ImageModel::ema_reset() {
  sync_to_host();
  const float* p = host_params();
  ema_.assign(p, p + table().total);
}

void ImageModel::ema_update(float d) {
  if (ema_.size() != table().total) ema_reset();
  sync_to_host();
  const float* p = host_params();
  float* e = ema_.data();
  const size_t n = ema_.size();
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) e[i] = d * e[i] + (1 - d) * p[i];
}

namespace {

// The DiT and the ViT run on either backend (the GPU's: bf16 activations and products, fp32 master weights).
std::unique_ptr<nn::Backend> backend_for(const ImageModelOptions& opt, const char* family) {
  if (!opt.cuda) return nn::make_cpu_backend(opt.lowp);
  KILN_CHECK(gpu::initialized(), "--device cuda: the GPU is not initialised (a ", family, " model)");
  KILN_CHECK(!opt.lowp || *opt.lowp == LowpType::BF16, "--device cuda: image models run in bf16");
  return nn::make_cuda_backend();
}

// The DiT as a denoise model.
class DiTImage final : public HostImageModel<DiT> {
 public:
  DiTImage(const DiTConfig& c, const ImageModelOptions& opt)
      : HostImageModel(backend_for(opt, "dit"), c, opt.with_grads) {}
  std::string type() const override { return "dit"; }
  bool provides(ImageTask t) const override { return t == ImageTask::Denoise; }
  size_t plan(int B, RecomputePolicy policy) override {
    KILN_CHECK(policy.kind == RecomputePolicy::None || (policy.kind == RecomputePolicy::Every && policy.k == 1),
               "--recompute ", policy.str(), ": the dit model supports none or block");
    planned_ = B;
    return m_.plan(B, policy.kind == RecomputePolicy::Every);
  }
  void denoise(float* out, const float* x, const float* c_noise, const int32_t* labels, int B) override {
    m_.forward(out, x, c_noise, labels, B);
  }
  void denoise_backward(const float* dout) override { m_.backward(dout); }
  void denoise_vjp(float* dx, const float* dout) override { m_.backward(dout, dx); }
};

// The ViT as a classify model.
class ViTImage final : public HostImageModel<ViT> {
 public:
  ViTImage(const ViTConfig& c, const ImageModelOptions& opt)
      : HostImageModel(backend_for(opt, "vit"), c, opt.with_grads) {
    KILN_CHECK(opt.label_smoothing >= 0 && opt.label_smoothing < 1, "--label-smoothing ", opt.label_smoothing,
               ": must be in [0, 1)");
    m_.set_label_smoothing(opt.label_smoothing);
  }
  std::string type() const override { return "vit"; }
  bool provides(ImageTask t) const override { return t == ImageTask::Classify; }
  size_t plan(int B, RecomputePolicy policy) override {
    KILN_CHECK(policy.kind == RecomputePolicy::None, "--recompute ", policy.str(), ": the vit model keeps all "
               "activations for now (--recompute none)");
    planned_ = B;
    logits_.resize(size_t(B) * m_.config().classes);
    return m_.plan(B);
  }
  double loss_forward(const float* images, const int32_t* labels, int B, bool train) override {
    KILN_CHECK(labels, "vit: the classify loss needs labels");
    const double l = m_.forward(logits_.data(), nullptr, images, labels, B);
    trained_ = train;
    return l;
  }
  void loss_backward() override {
    KILN_CHECK(trained_, "vit: loss_backward without a training loss_forward");
    m_.backward();
  }
  void predict(float* logits, float* features, const float* images, int B) override {
    m_.forward(logits ? logits : logits_.data(), features, images, nullptr, B);
    trained_ = false;
  }
  int feature_dim() const override { return m_.config().hidden; }

 private:
  bool trained_ = false;
  std::vector<float> logits_;
};

// One row per family: its model_type, its default configuration, its presets (a name, or nullopt when the name
// is not one of them), and the maker. A new family (e.g. a normalizing flow) adds a row here.
struct ImageFamily {
  const char* type;
  std::function<std::string()> default_config;
  std::function<std::optional<std::string>(const std::string&)> preset;
  std::function<std::unique_ptr<ImageModel>(const std::string&, const std::string&, const ImageModelOptions&)> make;
};

const std::vector<ImageFamily>& families() {
  static const std::vector<ImageFamily> f = {
      {"dit", [] { return DiTConfig().to_json(); },
       [](const std::string& n) -> std::optional<std::string> {
         if (n.rfind("DiT-", 0) != 0) return std::nullopt;
         return DiTConfig::preset(n).to_json();
       },
       [](const std::string& text, const std::string& where, const ImageModelOptions& o) {
         return std::unique_ptr<ImageModel>(new DiTImage(DiTConfig::from_json(text, where), o));
       }},
      {"vit", [] { return ViTConfig().to_json(); }, [](const std::string&) { return std::optional<std::string>(); },
       [](const std::string& text, const std::string& where, const ImageModelOptions& o) {
         return std::unique_ptr<ImageModel>(new ViTImage(ViTConfig::from_json(text, where), o));
       }},
      // Presets: realnvp (affine couplings), nice (additive).
      {"realnvp", [] { return RealNVPConfig().to_json(); },
       [](const std::string& n) -> std::optional<std::string> {
         if (n != "realnvp" && n != "nice") return std::nullopt;
         RealNVPConfig c;
         c.additive = n == "nice";
         return c.to_json();
       },
       make_realnvp_image},
  };
  return f;
}

const ImageFamily* find_family(const std::string& type) {
  for (const ImageFamily& f : families())
    if (type == f.type) return &f;
  return nullptr;
}

nlohmann::json parse(const std::string& text, const std::string& where) {
  try {
    nlohmann::json j = nlohmann::json::parse(text);
    KILN_CHECK(j.is_object(), where, ": not a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace

std::string image_model_types() {
  std::string s;
  for (const ImageFamily& f : families()) s += (s.empty() ? "" : ", ") + std::string(f.type);
  return s;
}

std::unique_ptr<ImageModel> make_image_model(const std::string& text, const std::string& where,
                                             const ImageModelOptions& opt) {
  const nlohmann::json j = parse(text, where);
  KILN_CHECK(j.contains("model_type") && j["model_type"].is_string(), where, ": no \"model_type\" (one of ",
             image_model_types(), ")");
  const std::string type = j["model_type"].get<std::string>();
  const ImageFamily* f = find_family(type);
  KILN_CHECK(f, where, ": model_type \"", type, "\" is not an image model (one of ", image_model_types(), ")");
  return f->make(text, where, opt);
}

std::string image_model_config(const std::string& model, ImageTask task, const ImageGeometry* g) {
  std::string text, where = "--model " + model;
  if (model.empty()) {
    const ImageFamily* f = find_family(task == ImageTask::Denoise ? "dit" : task == ImageTask::Classify ? "vit" : "realnvp");
    KILN_CHECK(f, "--model: no default model for the ", image_task_name(task), " task: give a config.json");
    text = f->default_config();
  } else {
    for (const ImageFamily& f : families())
      if (auto p = f.preset(model)) text = *p;
    if (text.empty()) {
      const std::string path = fs::is_directory(model) ? (fs::path(model) / "config.json").string() : model;
      KILN_CHECK(file_exists(path), "--model ", model, ": no such preset or config file (presets: DiT-S/2, DiT-S/4, "
                 "DiT-B/2, DiT-B/4)");
      text = read_file(path), where = path;
    }
  }
  nlohmann::json j = parse(text, where);
  if (g) j["image_size"] = g->image_size, j["channels"] = g->channels, j["classes"] = g->classes;
  return j.dump(2) + "\n";
}

}  // namespace kiln
