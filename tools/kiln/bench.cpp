// kiln bench train: times training steps of a model on random tokens and prints one JSON line.
// FLOPs per token = 6·N + 12·L·T·C, with N the parameters that take part in matrix products
// (all but the position embedding; the tied token embedding counts once, as the LM head; a mixture of experts
// counts the experts one token runs, its active parameters).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/gpu.h"
#include "core/rng.h"
#include "kernels/matmul.h"
#include "models/family.h"
#include "models/model.h"
#include "tools/kiln/command.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace {

struct BenchTrainOptions {
  std::string model;
  int batch = 4, seq = 64, steps = 5, warmup = 1, threads = 0, lm_head_chunk = 0;
  std::string recompute = "none", dtype = "fp32", device = "cpu";
};

// Random tokens and targets, positions 0..seq-1 in each row: the benchmark batch.
struct RandomBatch {
  std::vector<int32_t> in, tg, pos;
  RandomBatch(int64_t N, int seq, int vocab) : in(static_cast<size_t>(N)), tg(in.size()), pos(in.size()) {
    kiln::Rng rng(7);
    for (size_t i = 0; i < in.size(); i++) {
      in[i] = int32_t(rng.below(uint64_t(vocab)));
      tg[i] = int32_t(rng.below(uint64_t(vocab)));
      pos[i] = int32_t(int64_t(i) % seq);
    }
  }
};

// Per-step phase times (ms) after warm-up, reported as medians.
struct PhaseTimes {
  std::vector<double> step, fwd, bwd, opt;
  void add(double total, double f, double b, double a) {
    step.push_back(total);
    fwd.push_back(f);
    bwd.push_back(b);
    opt.push_back(a);
  }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
};

void bench_train(const BenchTrainOptions& o) {
  using namespace kiln;
  set_threads(o.threads);
  KILN_CHECK(o.batch > 0 && o.seq > 0 && o.steps > 0 && o.warmup >= 0, "bench train: sizes must be positive");
  KILN_CHECK(o.dtype == "fp32" || o.dtype == "bf16" || o.dtype == "fp16", "--dtype: expected fp32, bf16 or fp16");
  const DeviceSpec device = parse_device(o.device);
  if (device.cuda) {
    KILN_CHECK(o.dtype == "bf16", "bench train --device cuda runs bf16: pass --dtype bf16");
    gpu::init(device.index);
  }
  const ModelConfig cfg = load_model_config(o.model);
  ModelOptions mo;
  mo.cuda = device.cuda;
  if (o.dtype != "fp32") mo.lowp = o.dtype == "bf16" ? LowpType::BF16 : LowpType::FP16;
  std::unique_ptr<Model> model = make_model(cfg, mo);
  model->init_random(1);
  AdamW adam(model->table(), AdamWConfig{}, model->blocks().backend);
  model->plan(o.batch, o.seq, RecomputePolicy::parse(o.recompute), o.lm_head_chunk);
  const int64_t N = int64_t(o.batch) * o.seq;
  const RandomBatch rb(N, o.seq, cfg.vocab_size);
  const std::vector<int32_t>&in = rb.in, &tg = rb.tg, &pos = rb.pos;
  const AttentionParams ap = model->attention(o.batch, o.seq);
  // Whole steps, and their phases: forward (with the LM head's backward), backward, optimizer. Each phase ends
  // with the device synchronised, so wall-clock times are the device's.
  PhaseTimes pt;
  using Clock = std::chrono::steady_clock;
  auto since = [](Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); };
  for (int s = 0; s < o.warmup + o.steps; s++) {
    auto t0 = Clock::now();
    model->forward(in.data(), pos.data(), tg.data(), ap, 1.0f / float(N));  // copies the losses back: synchronous
    const double f = since(t0);
    auto t2 = Clock::now();
    model->backward();
    model->synchronize();
    const double b = since(t2);
    auto t3 = Clock::now();
    adam.update(model->blocks(), 1e-4f, s + 1, adam.grad_norm(model->blocks()), 1.0f, true);
    model->synchronize();
    const double a = since(t3);
    if (s >= o.warmup) pt.add(since(t0), f, b, a);
  }
  const double med = PhaseTimes::median(pt.step);
  std::vector<double>& ms = pt.step;
  std::sort(ms.begin(), ms.end());
  const double learned = cfg.positions == PositionKind::Learned ? double(cfg.max_positions) * cfg.d_model : 0.0;
  const double n_matmul = double(cfg.active_params()) - learned;
  const double flops_per_token = 6.0 * n_matmul + 12.0 * cfg.n_layer * o.seq * cfg.q_dim();
  nlohmann::json j = {{"bench", "train"},
                      {"family", cfg.family},
                      {"device", device.cuda ? "cuda" : "cpu"},
                      {"params", cfg.num_params()},
                      {"active_params", cfg.active_params()},
                      {"batch", o.batch},
                      {"seq", o.seq},
                      {"threads", omp_get_max_threads()},
                      {"ms_per_step", med},
                      {"ms_min", ms.front()},
                      {"ms_forward", PhaseTimes::median(pt.fwd)},
                      {"ms_backward", PhaseTimes::median(pt.bwd)},
                      {"ms_optimizer", PhaseTimes::median(pt.opt)},
                      {"tokens_per_s", double(N) / (med / 1e3)},
                      {"gflops", flops_per_token * double(N) / (med / 1e3) / 1e9},
                      {"recompute", o.recompute},
                      {"dtype", o.dtype},
                      {"blas_core", cpu::blas_core()},
                      {"activation_mb", double(model->activation_bytes()) / (1 << 20)},
                      {"state_mb", double(model->state_bytes()) / (1 << 20)}};
  std::printf("%s\n", j.dump().c_str());
}

kiln::cli::Command bench_cmd("bench", [](CLI::App& root) {
  auto* bench = root.add_subcommand("bench", "Benchmarks (one JSON line each)");
  bench->require_subcommand(1);
  auto o = std::make_shared<BenchTrainOptions>();
  auto* t = bench->add_subcommand("train", "Median time of a full training step (forward, backward, AdamW)");
  t->add_option("--model", o->model, "config.json or a directory holding one")->required();
  t->add_option("--batch", o->batch, "Sequences per step")->capture_default_str();
  t->add_option("--seq", o->seq, "Tokens per sequence")->capture_default_str();
  t->add_option("--steps", o->steps, "Timed steps")->capture_default_str();
  t->add_option("--warmup", o->warmup, "Untimed steps first")->capture_default_str();
  t->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  t->add_option("--dtype", o->dtype, "fp32, bf16 or fp16 matrix products")->capture_default_str();
  t->add_option("--device", o->device, "cpu, or cuda / cuda:N (bf16)")->capture_default_str();
  t->add_option("--recompute", o->recompute, "none, block, every:K or selective")->capture_default_str();
  t->add_option("--lm-head-chunk", o->lm_head_chunk, "Rows of logits held at once (0: all with --recompute none, else 64)")->capture_default_str();
  t->callback([o] { bench_train(*o); });
});

}  // namespace
