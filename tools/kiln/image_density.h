// Density image models (a normalizing flow trained by kiln train --objective nll) for kiln sample and kiln
// likelihood: open a trained directory whatever its task, sample a flow, and its exact bits/dim on images.
#pragma once
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/file_io.h"
#include "core/gpu.h"
#include "core/rng.h"
#include "models/image_model.h"
#include "train/checkpoint_dir.h"
#include "train/diffusion_trainer.h"

namespace kiln::cli {

// The directory holding config.json: `path` itself, or its latest checkpoint.
inline std::string image_model_dir(const std::string& path) {
  if (file_exists((std::filesystem::path(path) / "config.json").string())) return path;
  const std::string l = latest_checkpoint(path);
  KILN_CHECK(!l.empty(), "--model ", path, ": no config.json and no latest checkpoint");
  return l;
}

// The model of a directory when it is a density model (its weights loaded: ema.safetensors when asked and present,
// as kiln train --objective nll --ema-decay writes it, else model.safetensors), else null. With device.cuda
// the GPU is initialised and the model made on it (only once the directory is known to hold a density model).
inline std::unique_ptr<ImageModel> load_density_model(const std::string& path, bool ema = true,
                                                      const DeviceSpec& device = {}) {
  const std::string dir = image_model_dir(path);
  const std::string cp = (std::filesystem::path(dir) / "config.json").string();
  ImageModelFiles f;
  f.dir = dir, f.config_json = read_file(cp);
  ImageModelOptions mo;
  mo.with_grads = false;
  if (!make_image_model(f.config_json, cp, mo)->provides(ImageTask::Density)) return nullptr;
  if (device.cuda) gpu::init(device.index), mo.cuda = true;
  return load_image_model(f, mo, ema);
}

// K images from latents z ~ N(0, T²·I) (T: the temperature), in batches.
inline std::vector<float> sample_density(ImageModel& m, int K, double temperature, Rng& r, int batch) {
  const int64_t P = m.pixels();
  std::vector<float> z(size_t(K) * P), x(z.size());
  for (float& v : z) v = float(temperature * r.normal());
  for (int i = 0; i < K; i += batch) {
    const int b = std::min(batch, K - i);
    m.generate(x.data() + int64_t(i) * P, z.data() + int64_t(i) * P, nullptr, b);
  }
  for (float& v : x) v = std::min(1.0f, std::max(-1.0f, v));  // the data range
  return x;
}

// Bits/dim of the first N images, one value per batch (the model's loss, dequantised by its evaluation seed).
inline std::vector<double> density_bits_per_dim(ImageModel& m, const float* images, int64_t N, int batch) {
  const int64_t P = m.pixels();
  std::vector<double> out;
  for (int64_t i = 0; i < N; i += batch) {
    const int b = int(std::min<int64_t>(batch, N - i));
    out.push_back(m.loss_forward(images + i * P, nullptr, b, /*train=*/false));
  }
  return out;
}

}  // namespace kiln::cli
