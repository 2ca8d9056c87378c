// `kiln train --objective classify`: a loss model (models/image_model.h: a classifier such as the ViT, trained by
// cross-entropy, or a density model by its negative log-likelihood) trained on image shards, and the judge that uses it on generated images: class accuracy of class-conditional samples and a Fréchet distance
// between feature statistics (our stand-in for FID: the classifier's pooled features instead of Inception's).
// The classifier directory: <out>/config.json (its model_type), <out>/model.safetensors, <out>/eval.json.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/image_model.h"
#include "train/trainer.h"

namespace kiln {

// TrainOptions supplies model (a config.json of a classify or density model, or empty for the default vit), data, batch, steps, lr,
// min_lr, lr_schedule, warmup, adamw, seed, threads, out, metrics, eval_every, progress. Returns the test (or val)
// accuracy.
// task Classify (--objective classify) or Density (--objective nll: a normalizing flow, loss in bits/dim); the
// default --model is the factory's default for the task.
double train_classifier(const TrainOptions& opt, ImageTask task = ImageTask::Classify);

class ImageJudge {
 public:
  explicit ImageJudge(const std::string& dir, int batch = 256);
  ~ImageJudge();
  int feature_dim() const;
  // Predictions [n] and features [n, D] (either may be null) of n images [n, C, H, W].
  void run(const float* images, int64_t n, int32_t* pred, float* features);

 private:
  std::unique_ptr<ImageModel> m_;
  int batch_;
};

// ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) of two feature sets [n, D] (Tr(Σ₁Σ₂)^½ from the eigenvalues of the symmetric
// Σ₁^½Σ₂Σ₁^½, by Jacobi rotations in double).
double frechet_distance(const float* a, int64_t na, const float* b, int64_t nb, int D);

}  // namespace kiln
