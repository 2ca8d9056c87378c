// kiln sample: images from a trained image model (kiln train --objective ...) with one of the samplers of
// infer/diffusion_sampler.h, or from a normalizing flow (kiln train --objective nll: x = f⁻¹(z)); writes a PNG grid
// and the raw samples (safetensors), prints the evaluations used.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/gpu.h"
#include "core/png.h"
#include "core/safetensors.h"
#include "infer/diffusion_sampler.h"
#include "tools/kiln/command.h"
#include "tools/kiln/image_density.h"
#include "tools/kiln/omp_wait.h"
#include "train/classify_trainer.h"
#include "train/diffusion_trainer.h"
#include "train/images.h"
#include "train/trainer.h"

namespace {

struct SampleCli {
  std::string model, out = "samples.png";
  kiln::SamplerOptions s;
  int count = 16, cls = -1, batch = 64, threads = 0;
  bool unconditional = false, raw_weights = false;
  double temperature = 1.0;
  std::string judge, reference, device = "cpu", noise;
  uint64_t seed = 1;
};

// Samples in [-1, 1] to 8-bit pixels, tiled row-major in a near-square grid with a 1-pixel gap.
kiln::Image8 grid(const std::vector<float>& x, int K, int C, int H) {
  const int cols = int(std::ceil(std::sqrt(double(K)))), rows = (K + cols - 1) / cols, g = 1;
  kiln::Image8 im{cols * (H + g) - g, rows * (H + g) - g, C == 3 ? 3 : 1, {}};
  im.pixels.assign(size_t(im.width) * im.height * im.channels, 0);
  for (int k = 0; k < K; k++) {
    const int r0 = (k / cols) * (H + g), c0 = (k % cols) * (H + g);
    for (int ch = 0; ch < im.channels; ch++)
      for (int i = 0; i < H; i++)
        for (int j = 0; j < H; j++) {
          const float v = x[((size_t(k) * C + ch) * H + i) * H + j];
          const float p = std::min(255.0f, std::max(0.0f, std::round((v + 1.0f) * 127.5f)));
          im.pixels[(size_t(r0 + i) * im.width + c0 + j) * im.channels + ch] = uint8_t(p);
        }
  }
  return im;
}

kiln::cli::Command sample_cmd("sample", [](CLI::App& root) {
  auto o = std::make_shared<SampleCli>();
  auto* c = root.add_subcommand("sample", "Sample images from an image model trained with kiln train --objective");
  c->add_option("--model", o->model, "Checkpoint directory (or a training --out directory: its latest)")->required();
  c->add_option("--sampler", o->s.name,
                "ddpm, ddim (ddpm models); euler-maruyama, edm-euler, edm-heun (ve, edm); flow-euler, flow-midpoint, "
                "flow-heun (flow, gvp); not used by a flow (density) model");
  c->add_option("--steps", o->s.steps, "Sampler steps")->capture_default_str();
  c->add_option("--guidance", o->s.guidance, "Classifier-free guidance scale w (1: none)")->capture_default_str();
  c->add_option("--class", o->cls, "Class of every sample (default: classes in turn, 0, 1, ...)");
  c->add_flag("--unconditional", o->unconditional, "Sample with the null class");
  c->add_option("--count", o->count, "Number of images")->capture_default_str();
  c->add_option("--out", o->out, "PNG grid path; the samples also go to the same name with .safetensors")
      ->capture_default_str();
  c->add_option("--seed", o->seed, "Noise seed")->capture_default_str();
  c->add_option("--noise", o->noise, "safetensors file whose F32 tensor 'noise' [count, C, H, W] is the starting "
                "noise (the rest of the sampler's draws, if any, come from --seed): to sample what a peer samples");
  c->add_option("--eta", o->s.eta, "ddim: eta (0: deterministic)")->capture_default_str();
  c->add_option("--churn", o->s.churn, "edm-*: S_churn (0: deterministic)")->capture_default_str();
  c->add_option("--rho", o->s.rho, "edm-*, euler-maruyama: the step schedule's rho")->capture_default_str();
  c->add_option("--sigma-min", o->s.sigma_min, "edm-*, euler-maruyama: smallest sigma (0: the objective's)");
  c->add_option("--sigma-max", o->s.sigma_max, "edm-*, euler-maruyama: largest sigma (0: the objective's)");
  c->add_option("--batch", o->batch, "Rows per network call (with --guidance every image is two rows, its "
                "conditional and unconditional ones)")->capture_default_str();
  c->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  c->add_option("--device", o->device, "cpu, or cuda / cuda:N: run a diffusion model's network (a flow's coupling "
                "MLPs) on the GPU (bf16 activations and products; the sampler's updates, the flow's elementwise "
                "layers stay fp32 on the host)")
      ->capture_default_str();
  c->add_option("--judge", o->judge,
                "Classifier directory (kiln train --objective classify): report the share of samples classified as "
                "their class and, with --reference, the Fréchet distance in its feature space");
  c->add_option("--reference", o->reference, "Image shards (a prepared directory: its test split) for the distance");
  c->add_flag("--raw-weights", o->raw_weights, "Use model.safetensors instead of the EMA weights (ema.safetensors)");
  c->add_option("--temperature", o->temperature, "Flow (density) models: latents z ~ N(0, T^2)")
      ->capture_default_str();
  c->callback([o, c] {
    kiln::cli::prefer_passive_omp_wait();  // thousands of parallel regions per sample on a shared machine
    kiln::set_threads(o->threads);
    KILN_CHECK(o->count > 0, "--count ", o->count, ": must be positive");
    KILN_CHECK(o->batch > 0, "--batch ", o->batch, ": must be positive");
    const kiln::DeviceSpec device = kiln::parse_device(o->device);
    if (std::unique_ptr<kiln::ImageModel> flow = kiln::cli::load_density_model(o->model, !o->raw_weights, device)) {
      // A normalizing flow: x = f⁻¹(z), one inverse per image.
      KILN_CHECK(o->temperature > 0, "--temperature ", o->temperature, ": must be positive");
      const kiln::ImageGeometry g = flow->geometry();
      flow->plan(std::min(o->batch, o->count));
      kiln::Rng r(o->seed);
      const auto t0 = std::chrono::steady_clock::now();
      const std::vector<float> x = kiln::cli::sample_density(*flow, o->count, o->temperature, r, o->batch);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      kiln::write_png(o->out, grid(x, o->count, g.channels, g.image_size));
      std::string st = o->out;
      if (st.size() > 4 && st.substr(st.size() - 4) == ".png") st = st.substr(0, st.size() - 4);
      st += ".safetensors";
      const int64_t H = g.image_size;
      kiln::write_safetensors(st, {{"images", kiln::DType::F32, kiln::Shape{o->count, g.channels, H, H},
                                    const_cast<float*>(x.data())}},
                              {{"model", flow->type()}, {"temperature", std::to_string(o->temperature)}});
      nlohmann::json j = {{"out", o->out}, {"samples", st}, {"model", flow->type()}, {"nfe", 1},
                          {"temperature", o->temperature}, {"count", o->count}, {"seconds", secs},
                          {"images_per_second", o->count / secs}};
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    KILN_CHECK(c->count("--sampler") > 0, "--sampler: required for a diffusion model (ddpm, ddim, euler-maruyama, "
               "edm-euler, edm-heun, flow-euler, flow-midpoint, flow-heun)");
    const kiln::ImageModelFiles f = kiln::find_image_model(o->model);
    kiln::ImageModelOptions mo;
    mo.with_grads = false;
    if (device.cuda) kiln::gpu::init(device.index), mo.cuda = true;
    std::unique_ptr<kiln::ImageModel> model = kiln::load_image_model(f, mo, !o->raw_weights);
    const kiln::ImageGeometry cfg = model->geometry();
    KILN_CHECK(o->count > 0, "--count ", o->count, ": must be positive");
    KILN_CHECK(o->batch > 0, "--batch ", o->batch, ": must be positive");
    KILN_CHECK(o->cls < cfg.classes, "--class ", o->cls, ": the model has classes 0..", cfg.classes - 1);
    o->s.null_class = cfg.classes;
    kiln::check_sampler(f.objective, o->s);
    // The sampler asks for the guided rows (conditional then unconditional) in one call of 2·count.
    const int planned = std::min(o->batch, o->count * (o->s.guidance != 1 ? 2 : 1));
    model->plan(planned);
    std::vector<int32_t> labels(size_t(o->count));
    for (int k = 0; k < o->count; k++)
      labels[size_t(k)] = o->unconditional ? cfg.classes : o->cls >= 0 ? o->cls : k % cfg.classes;
    const int64_t P = int64_t(cfg.channels) * cfg.image_size * cfg.image_size;
    std::vector<float> x(size_t(o->count) * P);
    kiln::Rng r(o->seed);
    kiln::NoiseSource noise = kiln::rng_noise(r);
    std::vector<float> given;  // --noise: the first draw of count·P values comes from the file
    if (!o->noise.empty()) {
      const kiln::SafeTensorsReader st(o->noise);
      const kiln::Tensor& t = st.get("noise");
      KILN_CHECK(t.dtype == kiln::DType::F32 && t.numel() == o->count * P, "--noise ", o->noise, ": tensor 'noise' "
                 "must be F32 with ", o->count * P, " values (count ", o->count, " x ", P, "), has ", t.numel());
      given.assign(t.f32(), t.f32() + t.numel());
      noise = [&given, rn = kiln::rng_noise(r)](float* z, int64_t n) {
        if (!given.empty() && n == int64_t(given.size())) {
          std::copy(given.begin(), given.end(), z);
          given.clear();
        } else {
          rn(z, n);
        }
      };
    }
    const auto t0 = std::chrono::steady_clock::now();
    const kiln::SampleResult res = kiln::sample(f.objective, o->s, kiln::denoiser_net(*model, f.objective, planned),
                                                x.data(), labels.data(), o->count, P, noise);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    kiln::write_png(o->out, grid(x, o->count, cfg.channels, cfg.image_size));
    std::string st = o->out;
    if (st.size() > 4 && st.substr(st.size() - 4) == ".png") st = st.substr(0, st.size() - 4);
    st += ".safetensors";
    std::vector<float> lf(labels.begin(), labels.end());
    const int64_t H = cfg.image_size;
    kiln::write_safetensors(st,
                            {{"images", kiln::DType::F32, kiln::Shape{o->count, cfg.channels, H, H}, x.data()},
                             {"labels", kiln::DType::I32, kiln::Shape{o->count}, labels.data()}},
                            {{"sampler", o->s.name}, {"steps", std::to_string(o->s.steps)},
                             {"nfe", std::to_string(res.nfe)}, {"guidance", std::to_string(o->s.guidance)},
                             {"objective", f.objective.name}});
    nlohmann::json j = {{"out", o->out},         {"samples", st},          {"sampler", o->s.name},
                        {"objective", f.objective.name}, {"steps", o->s.steps}, {"nfe", res.nfe},
                        {"guidance", o->s.guidance}, {"count", o->count}, {"seconds", secs},
                        {"images_per_second", o->count / secs}};
    if (!o->judge.empty()) {
      kiln::ImageJudge judge(o->judge);
      const int D = judge.feature_dim();
      std::vector<int32_t> pred(size_t(o->count));
      std::vector<float> feats(size_t(o->count) * D);
      judge.run(x.data(), o->count, pred.data(), feats.data());
      if (!o->unconditional) {
        int right = 0;
        for (int k = 0; k < o->count; k++) right += pred[size_t(k)] == labels[size_t(k)];
        j["class_accuracy"] = double(right) / o->count;
      }
      if (!o->reference.empty()) {
        const kiln::ImageSet ref = kiln::load_images(o->reference, "test");
        std::vector<float> rf(size_t(ref.size()) * D);
        judge.run(ref.images.data(), ref.size(), nullptr, rf.data());
        j["frechet_distance"] = kiln::frechet_distance(feats.data(), o->count, rf.data(), ref.size(), D);
        j["reference_images"] = ref.size();
      }
    }
    std::printf("%s\n", j.dump().c_str());
  });
});

}  // namespace
