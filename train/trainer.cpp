#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/file_io.h"
#include "core/gpu.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/model.h"
#include "train/checkpoint_dir.h"
#include "train/data_parallel.h"
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

// Mean loss per target over val_batches batches from the start of the validation data, each rank taking its
// share of every batch.
double evaluate(Model& model, BatchSource& val, int batches, Batch& batch, dist::Communicator& comm, Batch& local) {
  val.reset();
  double sum = 0;
  int64_t n = 0;
  for (int i = 0; i < batches; i++) {
    val.next(batch);
    take_share(batch, comm.rank(), comm.size(), local);
    if (local.n_tokens > 0)
      sum += forward(model, local, 0.0f);
    else
      model.idle_pass(false);  // a sharded model's collectives (ZeRO 2, 3), which every rank makes
    n += batch.count_targets();
  }
  comm.all_reduce_sum(&sum, 1);
  return n ? sum / double(n) : 0.0;
}

// A checkpoint in the single-process format, written by rank 0 (the optimizer state gathered to it first,
// segment by segment, and at stage 3 the parameters); a failure to write it stops every rank.
void save_checkpoint(const TrainOptions& opt, Model& model, DataParallel& dp, const TrainState& st,
                     dist::Communicator& comm) {
  if (dp.stage() >= 3)
    dp.gather_host_params();
  else
    model.sync_to_host();
  std::unique_ptr<AdamW> full;
  if (dp.optimizer().sharded()) {
    if (comm.rank() == 0) full = std::make_unique<AdamW>(model.table(), opt.adamw);
    dp.gather_optimizer(full.get());
  } else {
    dp.optimizer().sync_to_host();
  }
  std::string error;
  if (comm.rank() == 0) try {
      save_training_checkpoint(opt.out, model, full ? *full : dp.optimizer(), st, opt.save_dtype, opt.tokenizer,
                               opt.keep_checkpoints, parse_byte_size(opt.max_shard_size, "--max-shard-size"));
    } catch (const Error& e) {
      error = e.what();
    }
  model.drop_host_params();  // stage 3: the whole-block copy was for the checkpoint only
  dist::agree_on_error(comm, error);
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

namespace {

// What every rank must agree on: the model, the data and the options that shape the batches and the step.
std::string run_fingerprint(const TrainOptions& o, const ModelConfig& cfg) {
  std::string f = str(cfg.family, "|", cfg.num_params(), "|", cfg.vocab_size, "|", o.batch, "|", o.seq, "|",
                      o.grad_accum, "|", o.steps, "|", o.zero_stage, "|", o.seed, "|", o.lr, "|", o.data_order, "|",
                      o.batching, o.packing, "|", o.dtype, "|", o.resume);
  for (const auto& path : expand_glob(o.data)) {
    std::error_code ec;
    f += str("|", std::filesystem::file_size(path, ec));
  }
  return f;
}

// Sums per-layer vectors (the experts' load) over the ranks, in place.
void dist_sum(dist::Communicator& comm, std::vector<std::vector<float>>& v) {
  std::vector<float> flat;
  for (const auto& x : v) flat.insert(flat.end(), x.begin(), x.end());
  comm.all_reduce_sum(flat.data(), flat.size());
  size_t at = 0;
  for (auto& x : v)
    for (float& f : x) f = flat[at++];
}

// Resident memory of this process now, bytes.
double resident_bytes() {
  std::ifstream in("/proc/self/statm");
  long pages = 0, resident = 0;
  in >> pages >> resident;
  return double(resident) * double(sysconf(_SC_PAGESIZE));
}

}  // namespace

double train(const TrainOptions& opt) {
  std::unique_ptr<dist::Communicator> comm = dist::make_communicator();
  try {
    return train(opt, *comm);
  } catch (const dist::RankQuiet&) {
    throw;
  } catch (const dist::AgreedError& e) {
    if (comm->size() == 1) throw;
    // Printed here, before MPI_Finalize (when `comm` goes), which the other ranks wait in: once a rank exits
    // non-zero mpirun ends the rest, and a line printed after that could be lost.
    std::fprintf(stderr, "kiln: %s\n", e.what());
    std::fflush(stderr);
    throw dist::RankQuiet();
  } catch (const std::exception& e) {
    // Errors agreed on (setup, data, a step's checks) reach every rank together; anything else is this
    // rank's alone, and the others wait in a collective: end the job, naming the rank.
    if (comm->size() == 1) throw;
    std::fprintf(stderr, "kiln: rank %d: %s\n", comm->rank(), e.what());
    comm->abort(1);
  }
  return 0;  // not reached
}

double train(const TrainOptions& opt, dist::Communicator& comm) {
  const int rank = comm.rank(), ranks = comm.size();
  const bool root = rank == 0;
  // Setup, on every rank; a rank's error (a flag, its data, a checkpoint) is agreed on below, so every rank
  // stops with one message from rank 0.
  std::string setup_error;
  std::unique_ptr<Model> model;
  std::unique_ptr<dist::Communicator> nccl;
  std::unique_ptr<DataParallel> dp;
  std::unique_ptr<BatchSource> loader, val;
  ModelConfig cfg;
  TrainState st;
  DeviceSpec device;
  std::string resume_dir;
  double state_measured = 0;
  try {
    validate(opt);
    KILN_CHECK(opt.zero_stage >= 0 && opt.zero_stage <= 3, "--zero-stage must be 0, 1, 2 or 3 (got ",
               opt.zero_stage, ")");
    const bool rows = !opt.packing && opt.batching != "packed";
    KILN_CHECK(!rows || opt.batch % ranks == 0, "--batch ", opt.batch, " (the global batch) does not divide over ",
               ranks, " ranks");
    RecomputePolicy::parse(opt.recompute);  // reject a bad policy before any work
    device = parse_device(opt.device);
    // One GPU a rank: --device cuda:N gives the machine's ranks GPUs N, N+1, ... in local rank order.
    if (device.cuda && comm.local_size() > 1) device.index += comm.local_rank();
    if (device.cuda) {
      KILN_CHECK(opt.dtype == "bf16", "--device cuda trains in bf16: pass --dtype bf16 (got --dtype ", opt.dtype, ")");
      KILN_CHECK(opt.loss_scale != "dynamic", "--loss-scale dynamic: bf16 on the GPU needs no loss scaling");
      gpu::init(device.index);
    }
    KILN_CHECK(opt.lm_head_chunk >= 0, "--lm-head-chunk must be >= 0");
    set_threads(opt.threads);
    if (opt.resume) {
      resume_dir = latest_checkpoint(opt.out);
      KILN_CHECK(!resume_dir.empty(), opt.out, ": no checkpoint to resume from (", opt.out, "/latest is missing)");
    }
    const std::string cfg_src = !resume_dir.empty() ? resume_dir : (!opt.init.empty() ? opt.init : opt.model);
    cfg = load_model_config(cfg_src);
    KILN_CHECK(opt.seq <= cfg.max_positions, "--seq ", opt.seq, " exceeds the model's context of ", cfg.max_positions,
               " positions");
    if (!opt.out.empty() && root) make_dirs(opt.out);
    loader = make_batch_source(opt, opt.data, cfg, /*validation=*/false);
    if (!opt.val_data.empty()) val = make_batch_source(opt, opt.val_data, cfg, /*validation=*/true);
  } catch (const Error& e) {
    setup_error = e.what();
  }
  dist::agree_on_error(comm, setup_error);
  // Every rank must train the same model on the same data with the same options.
  if (ranks > 1) {
    const std::string mine = run_fingerprint(opt, cfg);
    uint64_t len = mine.size();
    comm.broadcast(&len, sizeof len, 0);
    std::string theirs = root ? mine : std::string(len, '\0');
    comm.broadcast(theirs.data(), len, 0);
    dist::agree_on_error(comm, theirs == mine ? "" : "the model, data or options differ from rank 0's (the same "
                                                     "--model/--init, --data and training flags on every rank)");
  }

  try {
    ModelOptions mopt;
    mopt.cuda = device.cuda;
    if (opt.dtype != "fp32") mopt.lowp = opt.dtype == "bf16" ? LowpType::BF16 : LowpType::FP16;
    if (device.cuda && ranks > 1) {
      nccl = dist::make_nccl_communicator(comm, device.index);
      KILN_CHECK(nccl, "--device cuda on ", ranks, " ranks needs NCCL, and this kiln was built without it");
    }
    const double rss0 = resident_bytes();
    mopt.mtp_lambda = opt.mtp_lambda;
    // ZeRO 2, 3: the model holds this rank's segment of the gradients (and parameters) only.
    mopt.shard = DataParallel::shard_options(model_param_table(cfg), opt.zero_stage, rank, ranks);
    model = make_model(cfg, mopt);
    model->set_seq_aux_alpha(opt.seq_aux_alpha);
    dp = std::make_unique<DataParallel>(comm, nccl ? *nccl : comm, *model, opt.adamw, opt.zero_stage);
    state_measured = resident_bytes() - rss0;
    st.seed = opt.seed;
    if (!resume_dir.empty()) {
      // Checkpoints hold the whole optimizer state: each rank keeps its part.
      AdamW full(model->table(), opt.adamw);
      st = load_training_checkpoint(resume_dir, *model, full);
      dp->scatter_optimizer(full);
      loader->set_state(st.loader);
      KILN_CHECK(st.step <= opt.steps, resume_dir, ": checkpoint is at step ", st.step, ", past --steps ", opt.steps);
      model->params_changed();
    } else if (!opt.init.empty()) {
      load_model_weights(opt.init, cfg, model->table(), model->host_params());
      model->params_changed();
    } else {
      model->init_random(opt.seed);
    }
  } catch (const Error& e) {
    setup_error = e.what();
  }
  dist::agree_on_error(comm, setup_error);
  const int B = opt.batch, T = opt.seq;
  const int B_local = (!opt.packing && opt.batching != "packed") ? B / ranks : B;

  const double MB = 1024.0 * 1024.0;
  if (device.cuda && root) {
    const gpu::DeviceInfo info = gpu::init(device.index);
    std::fprintf(stderr, "kiln train: device %s (sm_%d%d, %d SMs, %.1f GiB)%s\n", info.name.c_str(), info.sm_major,
                 info.sm_minor, info.sm_count, double(info.total_memory) / double(1 << 30),
                 info.emulated ? " [SIMT emulator]" : "");
  }
  const size_t act_bytes = model->plan(B_local, T, RecomputePolicy::parse(opt.recompute), opt.lm_head_chunk);
  if (root && device.cuda)
    std::fprintf(stderr,
                 "kiln train: %s, %.2fM parameters | GPU memory plan: weights+bf16 copy+grads %.1f MB, "
                 "activations %.1f MB\n",
                 cfg.family.c_str(), double(cfg.num_params()) / 1e6, double(model->state_bytes()) / MB,
                 double(act_bytes) / MB);
  else if (root)
    std::fprintf(stderr,
                 "kiln train: %s, %.2fM parameters | memory plan: weights, grads%s %.1f MB, AdamW %.1f MB, "
                 "activations %.1f MB (per rank)\n",
                 cfg.family.c_str(), double(cfg.num_params()) / 1e6,
                 opt.dtype == "fp32" ? "" : ", 16-bit weight copies", double(model->state_bytes()) / MB,
                 double(dp->optimizer_bytes()) / MB, double(act_bytes) / MB);
  if (ranks > 1) {
    // Measured per-rank state (resident growth over building the model and its optimizer part), largest rank.
    std::vector<double> per(size_t(ranks), 0.0);
    per[size_t(rank)] = state_measured;
    comm.all_reduce_sum(per.data(), per.size());
    if (root)
      std::fprintf(stderr, "kiln train: %d ranks (%s%s), ZeRO stage %d, global batch %d, reduction %s | state per "
                   "rank measured %.1f MB (largest rank; weights, grads, optimizer part)\n",
                   ranks, comm.name().c_str(), nccl ? " + nccl" : "", opt.zero_stage, B,
                   dp->overlapping() ? "overlapped with the backward"
                   : opt.zero_stage >= 2 ? "unit by unit as the model asks" : "after the backward",
                   *std::max_element(per.begin(), per.end()) / MB);
  } else if (std::getenv("KILN_REPORT_STATE_MEMORY")) {
    std::fprintf(stderr, "kiln train: state measured %.1f MB\n", state_measured / MB);
  }

  std::ofstream metrics;
  if (!opt.metrics.empty() && root) {
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
  // (micro-batches can hold different numbers of them when packed or masked). Every rank reads the global
  // micro-batches and trains on its share (train/data_parallel.h).
  std::vector<Batch> micro(size_t(opt.grad_accum));
  Batch local, val_batch;
  const bool tty = opt.progress && isatty(2) && root;
  const int log_every = std::max(1, opt.steps / 20);
  double last_val = NAN, loss = st.last_loss;
  auto run_start = Clock::now();
  const char* kill_env = std::getenv("KILN_TEST_KILL_AT_STEP");
  const int64_t kill_at_step = kill_env ? std::atoll(kill_env) : 0;
  // Test hook: with KILN_TEST_KILL_RANK, only that rank dies, in the middle of the step (after its backward,
  // before the gradient reduction), so the others are left waiting in a collective.
  const char* kill_rank_env = std::getenv("KILN_TEST_KILL_RANK");
  const int kill_rank = kill_rank_env ? std::atoi(kill_rank_env) : -1;
  int64_t steps_this_run = 0;

  for (int64_t step = st.step; step < opt.steps; step++) {
    auto t0 = Clock::now();
    // Gradients are zero here: fresh, or cleared by the previous update (or skip).
    int64_t n_targets = 0, tokens_per_step = 0;
    std::string step_error;
    try {
      for (Batch& b : micro) {
        loader->next(b);
        n_targets += b.count_targets();
        tokens_per_step += b.n_tokens;
      }
      KILN_CHECK(n_targets > 0, "step ", step + 1, ": the batch holds no training targets");
    } catch (const Error& e) {
      step_error = e.what();
    }
    dist::agree_on_error(comm, step_error);
    const float grad_scale = scaler.scale / float(n_targets);  // the global count: gradients sum over ranks
    double loss_sum = 0;
    // The model's loss terms (main_loss, mtp_loss), summed over micro-batches and ranks; the same names on every
    // rank (they follow the config).
    std::vector<std::pair<std::string, double>> parts = model->loss_parts();
    for (auto& p : parts) p.second = 0;
    for (size_t i = 0; i < micro.size(); i++) {
      const bool last_micro = i + 1 == micro.size();
      take_share(micro[i], rank, ranks, local);
      dp->begin_micro(last_micro);
      if (local.n_tokens > 0) {
        loss_sum += forward(*model, local, grad_scale);
        const auto mp = model->loss_parts();
        for (size_t j = 0; j < mp.size() && j < parts.size(); j++) parts[j].second += mp[j].second;
        model->backward();
      } else {
        model->idle_pass(true);  // a sharded model's collectives (ZeRO 2, 3), which every rank makes
      }
      if (last_micro && (inject_every || inject_at == step + 1) && root) {
        // Test hook: one infinite gradient (the overflow path of loss scaling), before it is reduced: the
        // first float is an embedding's, reduced after the backward.
        const float inf = INFINITY;
        model->blocks().backend->upload(model->blocks().grads, &inf, sizeof inf);
      }
      dp->after_backward();
    }
    if (kill_rank == rank && kill_at_step == step + 1) std::raise(SIGKILL);
    comm.all_reduce_sum(&loss_sum, 1);
    loss = loss_sum / double(n_targets);
    for (auto& p : parts) comm.all_reduce_sum(&p.second, 1);
    const float lr = sched.at(int(step));
    dp->reduce_gradients();
    const double norm = dp->grad_norm(1.0f / scaler.scale);
    const bool finite = std::isfinite(norm) && std::isfinite(loss);
    // Loss and norm are the same on every rank, and so are these checks: every rank stops at once.
    const float used_scale = scaler.scale;
    // The step's expert load (MoE models), summed over the ranks so that every rank's selection bias, which
    // follows it when the step is applied, stays the same.
    std::vector<std::vector<float>> load = model->take_expert_load();
    if (ranks > 1 && !load.empty()) dist_sum(comm, load);
    bool apply = false;
    try {
      if (!scaler.enabled)
        KILN_CHECK(finite, "step ", step + 1, ": loss ", loss, ", gradient norm ", norm,
                   " is not finite; stopping without saving");
      apply = scaler.record(finite, step + 1);
    } catch (const Error& e) {
      dist::fail_together(comm, e.what());
    }
    if (apply) {
      st.optimizer_steps++;
      dp->update(lr, st.optimizer_steps, norm, 1.0f / used_scale);
      if (!load.empty()) model->update_expert_bias(load, opt.bias_update_speed);
    } else {
      dp->skip();
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
    if (ranks > 1) {
      // Time in collectives, and how much of it the step waited for (the rest overlapped the backward).
      const auto c = dp->take_comm_seconds();
      m["comm_ms"] = c.total * 1e3;
      m["comm_exposed_ms"] = c.exposed * 1e3;
      if (dp->overlapping()) {
        m["overlap_ms"] = c.overlapped * 1e3;
        m["overlap_wait_ms"] = c.overlap_wait * 1e3;
      }
    }
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
      last_val = evaluate(*model, *val, opt.val_batches, val_batch, comm, local);
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
    else if (root && (st.step % log_every == 0 || last))
      std::fprintf(stderr, "%s\n", line);

    if (!opt.out.empty() && ((opt.save_every > 0 && st.step % opt.save_every == 0) || last))
      save_checkpoint(opt, *model, *dp, st, comm);
    // Test hook: die like a killed process (no cleanup) after this step, to test --resume.
    if (kill_rank < 0 && kill_at_step > 0 && st.step == kill_at_step) std::raise(SIGKILL);
  }
  if (tty) std::fprintf(stderr, "\n");
  if (!root) return loss;
  if (device.cuda)
    std::fprintf(stderr, "kiln train: done, final loss %.4f, GPU memory planned %.1f MB\n", loss,
                 double(model->state_bytes() + act_bytes) / MB);
  else
    std::fprintf(stderr, "kiln train: done, final loss %.4f, peak memory %.1f MB (planned %.1f MB)\n", loss,
                 peak_rss_mb(), double(model->state_bytes() + dp->optimizer_bytes() + act_bytes) / MB);
  return loss;
}

}  // namespace kiln
