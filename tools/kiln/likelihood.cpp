// kiln likelihood: bits/dim of a trained image model on image shards (a prepared directory's test split).
//   diffusion models (kiln train --objective edm|ve|flow|gvp): through the probability-flow ODE with Hutchinson's
//     trace estimator or the exact trace (infer/likelihood.h); one value per image, so the standard error covers
//     the images, the dequantisation noise and the probes
//   density models (kiln train --objective nll): the flow's exact log-likelihood of the dequantised images; the
//     standard error is over batch means
// Both print one JSON line: bits_per_dim, its standard error, the images used, the evaluations per image.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/gpu.h"
#include "infer/diffusion_sampler.h"
#include "infer/likelihood.h"
#include "tools/kiln/command.h"
#include "tools/kiln/image_density.h"
#include "train/diffusion_trainer.h"
#include "train/images.h"
#include "train/trainer.h"

namespace {

struct LikelihoodCli {
  std::string model, data, split = "test", device = "cpu";
  kiln::LikelihoodOptions l;
  int64_t count = 100;
  int batch = 16, threads = 0;
  uint64_t seed = 1;
  bool raw_weights = false;
};

kiln::cli::Command likelihood_cmd("likelihood", [](CLI::App& root) {
  auto o = std::make_shared<LikelihoodCli>();
  auto* c = root.add_subcommand("likelihood", "Bits/dim of a trained image model (diffusion: probability-flow ODE; "
                                              "flow: exact) on image shards");
  c->add_option("--model", o->model, "Checkpoint directory (or a training --out directory: its latest)")->required();
  c->add_option("--data", o->data, "Image shards: a prepared directory (with --split) or shard files")->required();
  c->add_option("--split", o->split, "Split of a prepared directory: train, val or test")->capture_default_str();
  c->add_option("--count", o->count, "Images (the first N of the split; 0: all)")->capture_default_str();
  c->add_option("--batch", o->batch, "Images per batch")->capture_default_str();
  c->add_option("--trace", o->l.trace, "Diffusion: hutchinson or exact (P·2 + 1 evaluations per stage)")
      ->capture_default_str();
  c->add_option("--probes", o->l.probes, "Diffusion: Hutchinson probes per image")->capture_default_str();
  c->add_option("--probe", o->l.probe, "Diffusion: rademacher or gaussian probes")->capture_default_str();
  c->add_option("--steps", o->l.steps, "Diffusion: RK4 steps of the ODE")->capture_default_str();
  c->add_option("--jacobian", o->l.jacobian,
                "Diffusion: vjp (z^T J by one backward pass: exact, the default) or fd (a central finite difference "
                "of two extra forwards per probe)")
      ->capture_default_str();
  c->add_option("--fd-step", o->l.fd_step, "Diffusion: finite-difference step of the JVP (times the level's scale)")
      ->capture_default_str();
  c->add_option("--level-min", o->l.level_min, "Diffusion: where the path starts (t or sigma; 0: the objective's)");
  c->add_option("--level-max", o->l.level_max, "Diffusion: where it ends (t or sigma; 0: the objective's)");
  c->add_option("--seed", o->seed, "Seed of the dequantisation noise and the probes")->capture_default_str();
  c->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  c->add_option("--device", o->device, "cpu, or cuda / cuda:N. Diffusion: the network in bf16 on the GPU (use "
                "--jacobian vjp there: a difference quotient of bf16 outputs is noise); a flow: its coupling MLPs")
      ->capture_default_str();
  c->add_flag("--raw-weights", o->raw_weights, "model.safetensors instead of the EMA weights (ema.safetensors: "
              "a diffusion model's always, a flow's when trained with --ema-decay)");
  c->callback([o] {
    kiln::set_threads(o->threads);
    KILN_CHECK(o->count >= 0, "--count ", o->count, ": must be non-negative");
    KILN_CHECK(o->batch > 0, "--batch ", o->batch, ": must be positive");
    const kiln::ImageSet data = kiln::load_images(o->data, o->split);
    const int64_t N = o->count == 0 ? data.size() : std::min<int64_t>(o->count, data.size());
    KILN_CHECK(N > 0, "--data ", o->data, ": no images in the ", o->split, " split");
    const auto t0 = std::chrono::steady_clock::now();
    nlohmann::json j;
    const kiln::DeviceSpec device = kiln::parse_device(o->device);
    std::unique_ptr<kiln::ImageModel> flow = kiln::cli::load_density_model(o->model, !o->raw_weights, device);
    const int64_t P = data.pixels();
    if (flow) {
      const kiln::ImageGeometry g = flow->geometry();
      KILN_CHECK(int64_t(g.channels) * g.image_size * g.image_size == P && g.image_size == data.height, "--data ",
                 o->data, ": ", data.channels, "x", data.height, "x", data.width, " images, the model takes ",
                 g.channels, "x", g.image_size, "x", g.image_size);
      flow->plan(o->batch);
      const std::vector<double> b = kiln::cli::density_bits_per_dim(*flow, data.images.data(), N, o->batch);
      const kiln::MeanSE m = kiln::mean_se(b);
      j = {{"model", flow->type()}, {"method", "exact"}, {"bits_per_dim", m.mean}, {"standard_error", m.se},
           {"standard_error_over", "batch means"}, {"images", N}, {"batch", o->batch}};
    } else {
      const kiln::ImageModelFiles f = kiln::find_image_model(o->model);
      kiln::ImageModelOptions mo;
      const bool vjp = o->l.jacobian == "vjp";
      mo.with_grads = vjp;  // the backward pass of the VJP
      if (device.cuda) kiln::gpu::init(device.index), mo.cuda = true;
      std::unique_ptr<kiln::ImageModel> model = kiln::load_image_model(f, mo, !o->raw_weights);
      KILN_CHECK(model->provides(kiln::ImageTask::Denoise), "--model ", o->model, ": a ", model->type(),
                 " model is neither a diffusion nor a density model");
      KILN_CHECK(model->pixels() == P, "--data ", o->data, ": images of ", P, " values, the model takes ",
                 model->pixels());
      kiln::check_likelihood(f.objective, o->l, P);
      // One network call holds (1 + 2K) copies of the batch (vjp: K).
      const int K = o->l.trace == "exact" ? int(P) : o->l.probes;
      const int planned = int(std::min<int64_t>(int64_t(o->batch) * (vjp ? K : 1 + 2 * K), 256));
      model->plan(planned);
      // The null class when the model was trained with label dropout: the unconditional density p(x).
      const kiln::ImageGeometry g = model->geometry();
      std::vector<int32_t> labels(size_t(N), f.label_dropout > 0 ? g.classes : 0);
      if (f.label_dropout == 0) std::copy_n(data.labels.begin(), N, labels.begin());
      int nfe = 0;
      const std::vector<double> b = kiln::dataset_bits_per_dim(
          f.objective, o->l, kiln::denoiser_net(*model, f.objective, planned), data.images.data(), labels.data(), N,
          P, o->batch, o->seed, &nfe, vjp ? kiln::denoiser_vjp(*model, f.objective, planned) : kiln::DiffusionVJP());
      const kiln::MeanSE m = kiln::mean_se(b);
      j = {{"model", model->type()}, {"objective", f.objective.name}, {"method", "probability-flow ODE"},
           {"trace", o->l.trace}, {"jacobian", o->l.jacobian}, {"probes", K}, {"probe", o->l.probe}, {"steps", o->l.steps},
           {"bits_per_dim", m.mean}, {"standard_error", m.se}, {"standard_error_over", "images"}, {"images", N},
           {"nfe_per_image", nfe}, {"backward_passes_per_image", vjp ? nfe : 0}, {"conditioning", f.label_dropout > 0 ? "null class" : "true labels"}};
    }
    j["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    j["dequantisation"] = "uniform, bits/dim = -log p/(P ln 2) + log2(127.5)";
    std::printf("%s\n", j.dump().c_str());
  });
});

}  // namespace
