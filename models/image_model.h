// What train/ and infer/ see of an image model (as models/model.h is for language models): a model made by a
// factory from its config.json ("model_type" names the family), which provides one or more tasks:
//   denoise   a network F(x; c_noise, y) for the objectives of models/diffusion.h (the DiT)
//   classify  logits and pooled features of images, trained by its own cross-entropy (the ViT)
//   density   an exact log-likelihood model, trained by its own negative log-likelihood, that can also map
//             latents to images (normalizing flows)
// Classify and density models are "loss models": loss_forward() computes the loss the trainer minimises, so one
// trainer (train/classify_trainer.h) trains both. The parameters live in one flat block in the model's
// ParamTable layout (the optimizer works on blocks()), with a host copy for checkpoints and an EMA copy kept
// through the interface. train/ and infer/ never name a family or an implementation.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/matmul_lowp.h"
#include "models/model.h"
#include "models/param_table.h"
#include "models/recompute.h"
#include "nn/backend.h"

namespace kiln {

enum class ImageTask { Denoise, Classify, Density };
const char* image_task_name(ImageTask t);

struct ImageModelOptions {
  bool cuda = false;             // the GPU backend (gpu::init first; bf16 activations and products), else the CPU
  std::optional<LowpType> lowp;  // 16-bit matrix products (mixed precision), fp32 when unset
  bool with_grads = true;
  float label_smoothing = 0;     // classify models: ε of the training loss's smoothed targets
};

// The data's geometry, which a config takes from the images it trains on.
struct ImageGeometry {
  int image_size = 28, channels = 1, classes = 10;
};

class ImageModel {
 public:
  virtual ~ImageModel() = default;
  virtual std::string type() const = 0;         // the config's model_type
  virtual std::string config_json() const = 0;  // a config.json that rebuilds this model
  virtual ImageGeometry geometry() const = 0;
  virtual bool provides(ImageTask t) const = 0;
  virtual const ParamTable& table() const = 0;
  int64_t pixels() const {
    const ImageGeometry g = geometry();
    return int64_t(g.channels) * g.image_size * g.image_size;
  }

  // Parameters: the host copy (checkpoints read and write it; call params_changed() after writing and
  // sync_to_host() before reading after device steps) and the blocks the optimizer updates.
  virtual float* host_params() = 0;
  virtual void params_changed() = 0;
  virtual void sync_to_host() = 0;
  virtual ParamBlocks blocks() = 0;
  // The family's initialisation, deterministic for a seed; then params_changed().
  virtual void init_random(uint64_t seed) = 0;
  virtual void zero_grad() = 0;
  // Activation memory for batches of up to B images under a recomputation policy. Returns bytes.
  virtual size_t plan(int B, RecomputePolicy policy = {}) = 0;
  virtual int planned() const = 0;

  // Denoise: out = F(x; c_noise, labels) for x [B, C, H, W], c_noise [B], labels [B] in [0, classes] (classes:
  // the null class); host arrays. denoise_backward accumulates the gradients of <out, dout> for the last forward.
  virtual void denoise(float* out, const float* x, const float* c_noise, const int32_t* labels, int B);
  virtual void denoise_backward(const float* dout);
  // Denoise: dx = (∂out/∂x)ᵀ·dout [B, C, H, W] for the last denoise forward, by one backward pass (the
  // likelihood's exact Jacobian products); needs a model made with gradients, whose parameter gradients
  // accumulate as in denoise_backward (zero_grad() before training on).
  virtual void denoise_vjp(float* dx, const float* dout);

  // Loss models: the mean training loss over B images (classify: cross-entropy, labels required; density: the
  // negative log-likelihood in the family's unit). With train, loss_backward() accumulates its gradients.
  virtual double loss_forward(const float* images, const int32_t* labels, int B, bool train);
  virtual void loss_backward();
  // Classify: logits [B, classes] and features [B, feature_dim()] (either may be null) of B images.
  virtual void predict(float* logits, float* features, const float* images, int B);
  virtual int feature_dim() const { return 0; }
  // Density: images [B, C, H, W] from latents z [B, C, H, W] (labels may be null).
  virtual void generate(float* images, const float* z, const int32_t* labels, int B);

  // A generator the model itself draws from while training (a flow's dequantisation noise), saved with a
  // checkpoint so that a resumed run draws what the uninterrupted one would: false when the model has none.
  virtual bool training_rng(uint64_t& seed, uint64_t& position) const { return false; }
  virtual void set_training_rng(uint64_t seed, uint64_t position) {}

  // The EMA copy of the parameters (host, ParamTable layout): ema_reset() copies the current weights,
  // ema_update(d) blends ema = d·ema + (1 − d)·params.
  void ema_reset();
  void ema_update(float decay);
  std::vector<float>& ema() { return ema_; }

 protected:
  [[noreturn]] void unsupported(ImageTask t) const;

 private:
  std::vector<float> ema_;
};

// What the families' adapters share: a network Net on a backend of its own, whose config has to_json(),
// image_size, channels and classes, and which holds its parameters (params(), grads(), params16() or nullptr)
// in table() layout on that backend. On the CPU the host copy is the parameters themselves; on a device backend
// it is a mirror: sync_to_host() downloads the device's values into it, params_changed() uploads it (and the
// network refreshes its 16-bit copy). An adapter derives from it and adds type(), provides(), plan() and its tasks.
template <class Net>
class HostImageModel : public ImageModel {
 public:
  template <class Config>
  HostImageModel(std::unique_ptr<nn::Backend> be, const Config& c, bool with_grads)
      : be_(std::move(be)), m_(c, *be_, with_grads) {
    if (!be_->on_host()) host_.assign(m_.table().total, 0.0f);
  }
  std::string config_json() const override { return m_.config().to_json(); }
  ImageGeometry geometry() const override {
    const auto& c = m_.config();
    return {c.image_size, c.channels, c.classes};
  }
  const ParamTable& table() const override { return m_.table(); }
  float* host_params() override { return be_->on_host() ? m_.params() : host_.data(); }
  void params_changed() override {
    if (!be_->on_host()) be_->upload(m_.params(), host_.data(), host_.size() * 4);
    m_.params_changed();
  }
  void sync_to_host() override {
    if (!be_->on_host()) be_->download(host_.data(), m_.params(), host_.size() * 4);
  }
  ParamBlocks blocks() override {
    ParamBlocks b;
    b.params = m_.params(), b.grads = m_.grads(), b.params16 = m_.params16(), b.n = m_.table().total;
    b.backend = be_.get();
    return b;
  }
  void init_random(uint64_t seed) override {
    m_.init_random(seed);
    sync_to_host();
  }
  void zero_grad() override { m_.zero_grad(); }
  int planned() const override { return planned_; }

 protected:
  std::unique_ptr<nn::Backend> be_;
  Net m_;
  int planned_ = 0;
  std::vector<float> host_;  // the host mirror of a device backend's parameters (empty on the CPU)
};

// Builds the model a config.json describes (model_type: dit, vit, or a family added to the table in
// image_model.cpp). `where` names the source in errors.
std::unique_ptr<ImageModel> make_image_model(const std::string& config_json, const std::string& where,
                                             const ImageModelOptions& opt = {});

// The config.json text for --model: a family's preset name (DiT-S/2 ...), a config.json path or a directory
// holding one, or empty for the default configuration of the family that provides `task` by default (denoise:
// dit, classify: vit); image_size, channels and classes are set from
// the data's geometry (g null: kept). Throws a one-line error naming --model.
std::string image_model_config(const std::string& model, ImageTask task, const ImageGeometry* g = nullptr);

// The model types of the table (for messages).
std::string image_model_types();

}  // namespace kiln
