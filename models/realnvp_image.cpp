// The RealNVP flow (models/realnvp.h) as a density model of models/image_model.h: its loss is bits per dimension
// of uniformly dequantised 8-bit images (infer/likelihood.h states the bound):
//   x = v + (u − ½)/127.5, u ~ U(0, 1) per value,   loss = −mean_b log p(x_b)/(P·ln 2) + log₂ 127.5.
// Training draws u from the model's generator (seeded by init_random; checkpoints carry its position);
// evaluation (train false) from a fixed seed, so a test set's bits/dim does not depend on what ran before. The
// first training batch initialises the actnorms (data-dependent init), unless the loaded weights say it ran.
// With opt.cuda the flow runs on the GPU backend (its MLPs in bf16, the elementwise layers in fp32:
// models/realnvp.h); the master parameters, their gradients and so the optimizer stay fp32 on the host
// (blocks() names a CPU backend for them).
#include "models/realnvp_image.h"

#include <cmath>

#include "core/error.h"
#include "core/gpu.h"
#include "core/rng.h"
#include "models/realnvp.h"

namespace kiln {

namespace {

class RealNVPImage final : public ImageModel {
 public:
  RealNVPImage(const RealNVPConfig& c, const ImageModelOptions& opt)
      : be_(make_be(opt)), host_be_(be_->on_host() ? nullptr : nn::make_cpu_backend()), m_(c, *be_),
        grads_(opt.with_grads) {}
  std::string type() const override { return "realnvp"; }
  std::string config_json() const override { return m_.config().to_json(); }
  ImageGeometry geometry() const override {
    const RealNVPConfig& c = m_.config();
    return {c.image_size, c.channels, c.classes};
  }
  bool provides(ImageTask t) const override { return t == ImageTask::Density; }
  const ParamTable& table() const override { return m_.table(); }
  float* host_params() override { return m_.params(); }
  void params_changed() override {}
  void sync_to_host() override {}
  ParamBlocks blocks() override {
    ParamBlocks b;
    b.params = m_.params(), b.grads = m_.grads(), b.n = m_.table().total;
    b.backend = host_be_ ? host_be_.get() : be_.get();  // the host holds the parameters on either backend
    return b;
  }
  void init_random(uint64_t seed) override {
    m_.init_random(seed);
    rng_ = Rng(seed ^ 0x9e3779b97f4a7c15ull);
  }
  void zero_grad() override { m_.zero_grad(); }
  bool training_rng(uint64_t& seed, uint64_t& position) const override {
    seed = rng_.seed(), position = rng_.position();
    return true;
  }
  void set_training_rng(uint64_t seed, uint64_t position) override { rng_ = Rng(seed, position); }
  size_t plan(int B, RecomputePolicy) override {
    KILN_CHECK(B > 0, "realnvp plan: batch ", B, " must be positive");
    planned_ = B;
    return size_t(B) * size_t(m_.config().pixels()) * 4 * 64;  // each layer's input and the MLPs' activations
  }
  int planned() const override { return planned_; }

  double loss_forward(const float* images, const int32_t*, int B, bool train) override {
    const int64_t P = m_.config().pixels();
    x_.assign(images, images + int64_t(B) * P);
    Rng eval(20260101);
    Rng& r = train ? rng_ : eval;
    for (float& v : x_) v = float(v + (double(r.uniform()) - 0.5) / 127.5);
    if (train && !m_.actnorm_initialized()) m_.init_actnorm(x_.data(), B);
    logp_.resize(size_t(B));
    m_.forward(logp_.data(), x_.data(), B);
    double mean = 0;
    for (double l : logp_) mean += l / B;
    B_ = B;
    return -mean / (double(P) * std::log(2.0)) + std::log2(127.5);
  }
  void loss_backward() override {
    KILN_CHECK(grads_, "realnvp: the model was made without gradients");
    const int64_t P = m_.config().pixels();
    std::vector<double> w(size_t(B_), -1.0 / (double(B_) * double(P) * std::log(2.0)));
    m_.backward(w.data());
  }
  void generate(float* images, const float* z, const int32_t*, int B) override { m_.inverse(images, z, B); }

 private:
  static std::unique_ptr<nn::Backend> make_be(const ImageModelOptions& opt) {
    if (opt.cuda) {
      KILN_CHECK(gpu::initialized(), "--device cuda: the GPU is not initialised (a realnvp model)");
      KILN_CHECK(!opt.lowp || *opt.lowp == LowpType::BF16, "--device cuda: a realnvp model's MLPs run in bf16");
      return nn::make_cuda_backend();
    }
    KILN_CHECK(!opt.lowp, "a realnvp model trains in fp32 on the CPU (--dtype fp32; bf16 is --device cuda's)");
    return nn::make_cpu_backend();
  }
  std::unique_ptr<nn::Backend> be_, host_be_;
  RealNVP m_;
  bool grads_;
  Rng rng_{1};
  int planned_ = 0, B_ = 0;
  std::vector<float> x_;
  std::vector<double> logp_;
};

}  // namespace

std::unique_ptr<ImageModel> make_realnvp_image(const std::string& text, const std::string& where,
                                               const ImageModelOptions& opt) {
  return std::make_unique<RealNVPImage>(RealNVPConfig::from_json(text, where), opt);
}

}  // namespace kiln
