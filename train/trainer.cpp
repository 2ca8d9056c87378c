#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/file_io.h"
#include "core/gpu.h"
#include "models/checkpoint.h"
#include "models/model.h"
#include "train/checkpoint_dir.h"
#include "train/dataloader.h"
#include "train/packing.h"
#include "train/loss_scale.h"
#include "train/schedule.h"

namespace kiln {

void set_threads(int threads) {
  if (threads <= 0) threads = int(sysconf(_SC_NPROCESSORS_ONLN));
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

namespace {

using Clock = std::chrono::steady_clock;

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = int64_t(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", long(t / 3600), long(t / 60 % 60));
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", long(t / 60), long(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%lds", long(t));
  return buf;
}

void validate(const TrainOptions& o) {
  KILN_CHECK(o.batch > 0, "--batch must be positive (got ", o.batch, ")");
  KILN_CHECK(o.seq > 0, "--seq must be positive (got ", o.seq, ")");
  KILN_CHECK(o.grad_accum > 0, "--grad-accum must be positive (got ", o.grad_accum, ")");
  KILN_CHECK(o.steps > 0, "--steps must be positive (got ", o.steps, ")");
  KILN_CHECK(o.lr > 0 && std::isfinite(o.lr), "--lr must be positive (got ", o.lr, ")");
  KILN_CHECK(o.min_lr >= 0 && o.min_lr <= o.lr, "--min-lr must be in [0, --lr] (got ", o.min_lr, ")");
  KILN_CHECK(o.warmup >= 0, "--warmup must be >= 0");
  KILN_CHECK(o.adamw.weight_decay >= 0, "--weight-decay must be >= 0");
  KILN_CHECK(o.seq_aux_alpha >= 0 && std::isfinite(o.seq_aux_alpha), "--seq-aux-alpha must be >= 0 (got ",
             o.seq_aux_alpha, ")");
  KILN_CHECK(o.bias_update_speed >= 0 && std::isfinite(o.bias_update_speed),
             "--bias-update-speed must be >= 0 (got ", o.bias_update_speed, ")");
  KILN_CHECK(o.save_every >= 0 && o.eval_every >= 0, "--save-every and --eval-every must be >= 0");
  KILN_CHECK(o.dtype == "fp32" || o.dtype == "bf16" || o.dtype == "fp16", "--dtype: expected fp32, bf16 or fp16, got '",
             o.dtype, "'");
  KILN_CHECK(o.loss_scale == "auto" || o.loss_scale == "none" || o.loss_scale == "dynamic",
             "--loss-scale: expected auto, none or dynamic, got '", o.loss_scale, "'");
  KILN_CHECK(o.initial_loss_scale > 0 && o.loss_scale_window > 0 && o.max_skipped_steps > 0,
             "--initial-loss-scale, --loss-scale-window and --max-skipped-steps must be positive");
  KILN_CHECK(o.save_dtype == "f32" || o.save_dtype == "bf16", "--save-dtype: expected f32 or bf16, got '",
             o.save_dtype, "'");
  parse_byte_size(o.max_shard_size, "--max-shard-size");
  KILN_CHECK(!o.data.empty(), "--data is required");
  KILN_CHECK(!o.model.empty() || !o.init.empty() || o.resume, "one of --model or --init is required");
  KILN_CHECK(!o.resume || !o.out.empty(), "--resume needs --out (the directory holding the checkpoints)");
  if (o.eval_every > 0) KILN_CHECK(!o.val_data.empty(), "--eval-every needs --val-data");
}

// The forward of one micro-batch.
double forward(Model& model, const Batch& b, float grad_scale) {
  const AttentionParams ap = b.attention(model.attention(b.B, b.T));
  return model.forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, grad_scale);
}

// Mean loss per target over val_batches batches from the start of the validation data.
double evaluate(Model& model, BatchSource& val, int batches, Batch& batch) {
  val.reset();
  double sum = 0;
  int64_t n = 0;
  for (int i = 0; i < batches; i++) {
    val.next(batch);
    sum += forward(model, batch, 0.0f);
    n += batch.count_targets();
  }
  return n ? sum / double(n) : 0.0;
}

// Keeps metric lines up to `step` (a resumed run rewrites the steps after its checkpoint).
void truncate_metrics(const std::string& path, int64_t step) {
  if (!file_exists(path)) return;
  std::istringstream in(read_file(path));
  std::string line, kept;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

double peak_rss_mb() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

}  // namespace

std::unique_ptr<BatchSource> make_batch_source(const TrainOptions& opt, const std::string& data,
                                               const ModelConfig& cfg, bool validation) {
  const auto order = validation ? DataLoader::Order::Sequential : DataLoader::parse_order(opt.data_order);
  KILN_CHECK(!opt.packing || opt.batching == "rows" || opt.batching == "packed",
             "--packing conflicts with --batching ", opt.batching);
  const std::string mode = opt.packing ? "packed" : opt.batching;
  KILN_CHECK(mode == "rows" || mode == "packed" || mode == "padded",
             "--batching: expected rows, packed or padded, got '", mode, "'");
  if (mode == "rows") {
    for (const auto& path : expand_glob(data))
      KILN_CHECK(!file_exists(path + ".mask"), path, ".mask: supervised data (loss masks) needs --packing or "
                 "--batching padded");
    return std::make_unique<DataLoader>(data, opt.batch, opt.seq, order, opt.seed, cfg.vocab_size);
  }
  auto docs = std::make_shared<const DocumentSet>(data, cfg.vocab_size);
  const bool shuffled = order == DataLoader::Order::Shuffled;
  if (mode == "packed")
    return std::make_unique<PackedSource>(docs, opt.batch, opt.seq, cfg.max_positions, shuffled, opt.seed);
  return std::make_unique<PaddedSource>(docs, opt.batch, opt.seq, cfg.max_positions, shuffled, opt.seed);
}

double train(const TrainOptions& opt) {
  validate(opt);
  RecomputePolicy::parse(opt.recompute);  // reject a bad policy before any work
  const DeviceSpec device = parse_device(opt.device);
  if (device.cuda) {
    KILN_CHECK(opt.dtype == "bf16", "--device cuda trains in bf16: pass --dtype bf16 (got --dtype ", opt.dtype, ")");
    KILN_CHECK(opt.loss_scale != "dynamic", "--loss-scale dynamic: bf16 on the GPU needs no loss scaling");
    gpu::init(device.index);
  }
  KILN_CHECK(opt.lm_head_chunk >= 0, "--lm-head-chunk must be >= 0");
  set_threads(opt.threads);
  const int B = opt.batch, T = opt.seq;

  std::string resume_dir;
  if (opt.resume) {
    resume_dir = latest_checkpoint(opt.out);
    KILN_CHECK(!resume_dir.empty(), opt.out, ": no checkpoint to resume from (", opt.out, "/latest is missing)");
  }
  const std::string cfg_src = !resume_dir.empty() ? resume_dir : (!opt.init.empty() ? opt.init : opt.model);
  const ModelConfig cfg = load_model_config(cfg_src);
  KILN_CHECK(T <= cfg.max_positions, "--seq ", T, " exceeds the model's context of ", cfg.max_positions, " positions");
  if (!opt.out.empty()) make_dirs(opt.out);

  ModelOptions mopt;
  mopt.cuda = device.cuda;
  if (opt.dtype != "fp32") mopt.lowp = opt.dtype == "bf16" ? LowpType::BF16 : LowpType::FP16;
  mopt.mtp_lambda = opt.mtp_lambda;
  std::unique_ptr<Model> model = make_model(cfg, mopt);
  model->set_seq_aux_alpha(opt.seq_aux_alpha);
  AdamW adam(model->table(), opt.adamw, model->blocks().backend);
  std::unique_ptr<BatchSource> loader = make_batch_source(opt, opt.data, cfg, /*validation=*/false);
  std::unique_ptr<BatchSource> val;
  if (!opt.val_data.empty()) val = make_batch_source(opt, opt.val_data, cfg, /*validation=*/true);

  TrainState st;
  st.seed = opt.seed;
  if (!resume_dir.empty()) {
    st = load_training_checkpoint(resume_dir, *model, adam);
    loader->set_state(st.loader);
    adam.moments_changed();
    KILN_CHECK(st.step <= opt.steps, resume_dir, ": checkpoint is at step ", st.step, ", past --steps ", opt.steps);
    model->params_changed();
  } else if (!opt.init.empty()) {
    load_model_weights(opt.init, cfg, model->table(), model->host_params());
    model->params_changed();
  } else {
    model->init_random(opt.seed);
  }

  const double MB = 1024.0 * 1024.0;
  if (device.cuda) {
    const gpu::DeviceInfo info = gpu::init(device.index);
    std::fprintf(stderr, "kiln train: device %s (sm_%d%d, %d SMs, %.1f GiB)%s\n", info.name.c_str(), info.sm_major,
                 info.sm_minor, info.sm_count, double(info.total_memory) / double(1 << 30),
                 info.emulated ? " [SIMT emulator]" : "");
  }
  const size_t act_bytes = model->plan(B, T, RecomputePolicy::parse(opt.recompute), opt.lm_head_chunk);
  const size_t n_floats = model->table().total;
  if (device.cuda)
    std::fprintf(stderr,
                 "kiln train: %s, %.2fM parameters | GPU memory plan: weights+bf16 copy+grads %.1f MB, "
                 "activations %.1f MB\n",
                 cfg.family.c_str(), double(cfg.num_params()) / 1e6, double(model->state_bytes()) / MB,
                 double(act_bytes) / MB);
  else
    std::fprintf(stderr,
                 "kiln train: %s, %.2fM parameters | memory plan: weights %.1f MB, grads %.1f MB, AdamW %.1f MB, "
                 "activations %.1f MB%s\n",
                 cfg.family.c_str(), double(cfg.num_params()) / 1e6, n_floats * 4 / MB, n_floats * 4 / MB,
                 n_floats * 8 / MB, double(act_bytes) / MB,
                 opt.dtype == "fp32" ? "" : str(", 16-bit weight copies ", n_floats * 2 / MB, " MB").c_str());

  std::ofstream metrics;
  if (!opt.metrics.empty()) {
    if (opt.resume) truncate_metrics(opt.metrics, st.step);
    metrics.open(opt.metrics, opt.resume ? std::ios::app : std::ios::trunc);
    KILN_CHECK(metrics.good(), opt.metrics, ": cannot open for writing");
  }

  LrSchedule sched;
  sched.kind = LrSchedule::parse(opt.lr_schedule);
  sched.lr = opt.lr;
  sched.min_lr = opt.min_lr;
  sched.warmup = opt.warmup;
  sched.total = opt.steps;

  const bool dynamic = opt.loss_scale == "dynamic" || (opt.loss_scale == "auto" && opt.dtype == "fp16");
  LossScaler scaler = dynamic ? LossScaler::dynamic(opt.initial_loss_scale, opt.loss_scale_window,
                                                    opt.max_skipped_steps)
                              : LossScaler{};
  if (dynamic && !resume_dir.empty()) {
    scaler.scale = st.loss_scale;
    scaler.clean = int(st.loss_scale_clean);
    scaler.skipped = st.skipped_steps;
  }
  const char* inject_env = std::getenv("KILN_TEST_OVERFLOW_AT_STEP");  // test hook: poison one step's gradients
  const bool inject_every = inject_env && std::string(inject_env) == "every";
  const int64_t inject_at = inject_env ? std::atoll(inject_env) : 0;

  // A step's micro-batches are read first so the loss is the mean over all of the step's targets
  // (micro-batches can hold different numbers of them when packed or masked).
  std::vector<Batch> micro(size_t(opt.grad_accum));
  Batch val_batch;
  const bool tty = opt.progress && isatty(2);
  const int log_every = std::max(1, opt.steps / 20);
  double last_val = NAN, loss = st.last_loss;
  auto run_start = Clock::now();
  const char* kill_env = std::getenv("KILN_TEST_KILL_AT_STEP");
  const int64_t kill_at_step = kill_env ? std::atoll(kill_env) : 0;
  int64_t steps_this_run = 0;

  for (int64_t step = st.step; step < opt.steps; step++) {
    auto t0 = Clock::now();
    // Gradients are zero here: fresh, or cleared by the previous update (or skip).
    int64_t n_targets = 0, tokens_per_step = 0;
    for (Batch& b : micro) {
      loader->next(b);
      n_targets += b.count_targets();
      tokens_per_step += b.n_tokens;
    }
    KILN_CHECK(n_targets > 0, "step ", step + 1, ": the batch holds no training targets");
    const float grad_scale = scaler.scale / float(n_targets);
    double loss_sum = 0;
    std::vector<std::pair<std::string, double>> parts;  // the model's loss terms (main_loss, mtp_loss), summed
    for (Batch& b : micro) {
      loss_sum += forward(*model, b, grad_scale);
      const auto p = model->loss_parts();
      if (parts.empty()) parts.assign(p.size(), {});
      for (size_t i = 0; i < p.size() && i < parts.size(); i++) parts[i] = {p[i].first, parts[i].second + p[i].second};
      model->backward();
    }
    loss = loss_sum / double(n_targets);
    const float lr = sched.at(int(step));
    if (inject_every || inject_at == step + 1) {
      const float inf = INFINITY;  // test hook: one infinite gradient (the overflow path of loss scaling)
      model->blocks().backend->upload(model->blocks().grads, &inf, sizeof inf);
    }
    const double norm = adam.grad_norm(model->blocks(), 1.0f / scaler.scale);
    const bool finite = std::isfinite(norm) && std::isfinite(loss);
    if (!scaler.enabled)
      KILN_CHECK(finite, "step ", step + 1, ": loss ", loss, ", gradient norm ", norm,
                 " is not finite; stopping without saving");
    const float used_scale = scaler.scale;
    // The step's expert load (MoE models); the selection bias follows it when the step is applied.
    const std::vector<std::vector<float>> load = model->take_expert_load();
    if (scaler.record(finite, step + 1)) {
      st.optimizer_steps++;
      adam.update(model->blocks(), lr, st.optimizer_steps, norm, 1.0f / used_scale, /*zero_grads=*/true);
      if (!load.empty()) model->update_expert_bias(load, opt.bias_update_speed);
    } else {
      model->zero_grad();
    }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    steps_this_run++;
    st.step = step + 1;
    st.loader = loader->state();
    st.last_loss = loss;
    st.loss_scale = scaler.scale;
    st.loss_scale_clean = scaler.clean;
    st.skipped_steps = scaler.skipped;

    const bool last = st.step == opt.steps;
    nlohmann::json m = {{"step", st.step},         {"loss", loss},
                        {"lr", lr},                {"grad_norm", norm},
                        {"tokens_per_s", double(tokens_per_step) / secs}, {"ms", secs * 1e3}};
    for (const auto& [name, v] : parts) m[name] = v / double(n_targets);
    // max/mean expert load, the worst MoE layer's (1: perfectly balanced).
    double load_ratio = NAN;
    if (!load.empty()) {
      m["expert_load"] = load;
      load_ratio = 0;
      for (const auto& l : load) {
        double sum = 0, mx = 0;
        for (float x : l) sum += x, mx = std::max(mx, double(x));
        if (sum > 0) load_ratio = std::max(load_ratio, mx * double(l.size()) / sum);
      }
      m["expert_load_max_mean"] = load_ratio;
    }
    if (scaler.enabled) {
      m["loss_scale"] = used_scale;
      m["skipped_steps"] = scaler.skipped;
      if (!finite) m["skipped"] = true;
    }
    if (val && opt.eval_every > 0 && (st.step % opt.eval_every == 0 || last)) {
      last_val = evaluate(*model, *val, opt.val_batches, val_batch);
      m["val_loss"] = last_val;
    }
    if (metrics.is_open()) {
      metrics << m.dump() << "\n";
      metrics.flush();
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
    const double eta = elapsed / double(steps_this_run) * double(opt.steps - st.step);
    char line[256];
    char load_str[48] = "";
    if (!std::isnan(load_ratio)) std::snprintf(load_str, sizeof load_str, " | load max/mean %.2f", load_ratio);
    std::snprintf(line, sizeof line, "step %ld/%d | loss %.4f%s%s | lr %.2e | %.0f tok/s | ETA %s", long(st.step),
                  opt.steps, loss,
                  std::isnan(last_val) ? "" : str(" | val ", std::to_string(last_val).substr(0, 6)).c_str(), load_str,
                  lr, double(tokens_per_step) / secs, format_duration(eta).c_str());
    if (tty)
      std::fprintf(stderr, "\r\033[K%s", line);
    else if (st.step % log_every == 0 || last)
      std::fprintf(stderr, "%s\n", line);

    if (!opt.out.empty() && ((opt.save_every > 0 && st.step % opt.save_every == 0) || last)) {
      model->sync_to_host();
      adam.sync_to_host();
      save_training_checkpoint(opt.out, *model, adam, st, opt.save_dtype, opt.tokenizer, opt.keep_checkpoints,
                               parse_byte_size(opt.max_shard_size, "--max-shard-size"));
    }
    // Test hook: die like a killed process (no cleanup) after this step, to test --resume.
    if (kill_at_step > 0 && st.step == kill_at_step) std::raise(SIGKILL);
  }
  if (tty) std::fprintf(stderr, "\n");
  if (device.cuda)
    std::fprintf(stderr, "kiln train: done, final loss %.4f, GPU memory planned %.1f MB\n", loss,
                 double(model->state_bytes() + act_bytes) / MB);
  else
    std::fprintf(stderr, "kiln train: done, final loss %.4f, peak memory %.1f MB (planned %.1f MB)\n", loss,
                 peak_rss_mb(), (n_floats * (opt.dtype == "fp32" ? 16 : 18) + act_bytes) / MB);
  return loss;
}

}  // namespace kiln
