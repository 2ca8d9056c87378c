#include "train/medusa_trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "models/medusa_checkpoint.h"
#include "nn/medusa.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace kiln {

namespace fs = std::filesystem;

void medusa_targets(const int32_t* targets, const int32_t* pos, int64_t N, int K, int32_t* out) {
  for (int k = 1; k <= K; k++)
    for (int64_t i = 0; i < N; i++) {
      const int64_t j = i + k;  // targets[j] is the token k places after targets[i]
      const bool same_seq = j < N && pos[j] == pos[i] + k;
      out[(k - 1) * N + i] = same_seq ? targets[j] : -1;
    }
}

namespace {

// <out>/step_N: the base, the heads and the tokenizer files; then <out>/latest moves to it (atomically).
std::string save(const TrainOptions& opt, Model& model, const nn::MedusaShape& s, const float* heads, int64_t step,
                 const std::string& tokenizer_dir) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
  const std::string dir = (fs::path(opt.out) / name).string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  KILN_CHECK(!ec, dir, ": cannot create the checkpoint directory (", ec.message(), ")");
  model.sync_to_host();
  save_model_checkpoint(dir, model.config(), model.table(), model.host_params(), DType::F32);
  save_medusa_heads(dir, s, heads);
  for (const char* f : {"encoder.json", "vocab.bpe", "tokenizer.json", "tokenizer_config.json"}) {
    const fs::path src = fs::path(tokenizer_dir) / f;
    if (!tokenizer_dir.empty() && fs::exists(src, ec)) write_file_atomic((fs::path(dir) / f).string(), read_file(src.string()));
  }
  const std::string tmp = (fs::path(opt.out) / ".latest.tmp").string();
  ::unlink(tmp.c_str());
  KILN_CHECK(::symlink(name, tmp.c_str()) == 0, tmp, ": cannot create symlink");
  KILN_CHECK(std::rename(tmp.c_str(), (fs::path(opt.out) / "latest").c_str()) == 0, opt.out, "/latest: cannot update");
  return dir;
}

// The step's gradients: the base's (joint training) in its table's file layout, then the heads'.
void write_grads(const std::string& path, Model& model, bool joint, const nn::MedusaShape& s, const float* grads) {
  std::vector<Tensor> ts;
  if (joint) {
    const ParamBlocks b = model.blocks();
    KILN_CHECK(b.grads && b.backend && b.backend->on_host(), "--medusa-grads-out: the base's gradients are not on the host");
    for (const FileTensor& f : model.table().file_tensors())
      ts.push_back(Tensor{f.name, DType::F32, f.shape, b.grads + f.offset});
  }
  for (int k = 0; k < s.K; k++) {
    const std::string h = "medusa." + std::to_string(k) + ".";
    ts.push_back({h + "res.weight", DType::F32, Shape{s.C, s.C}, const_cast<float*>(grads + s.w_off(k))});
    ts.push_back({h + "res.bias", DType::F32, Shape{s.C}, const_cast<float*>(grads + s.b_off(k))});
    ts.push_back({h + "head.weight", DType::F32, Shape{s.V, s.C}, const_cast<float*>(grads + s.h_off(k))});
  }
  write_safetensors(path, ts, {{"format", "pt"}});
}

}  // namespace

double train_medusa(const TrainOptions& opt, const MedusaTrainOptions& m) {
  using Clock = std::chrono::steady_clock;
  KILN_CHECK(m.heads >= 1 && m.heads <= 16, "--medusa-heads must be in [1, 16], got ", m.heads);
  KILN_CHECK(!opt.init.empty(), "--medusa-heads needs --init: the trained base checkpoint the heads go on");
  KILN_CHECK(opt.model.empty(), "--medusa-heads trains on a base given by --init, not a fresh --model");
  KILN_CHECK(!opt.data.empty(), "--data is required");
  KILN_CHECK(!opt.out.empty(), "--medusa-heads needs --out (where the checkpoints with heads go)");
  KILN_CHECK(opt.device == "cpu", "--medusa-heads trains on the CPU (got --device ", opt.device, ")");
  KILN_CHECK(opt.dtype == "fp32", "--medusa-heads trains in fp32 (got --dtype ", opt.dtype, ")");
  KILN_CHECK(!opt.resume, "--medusa-heads: --resume is not supported");
  KILN_CHECK(opt.steps >= 1 && opt.grad_accum >= 1, "--steps and --grad-accum must be >= 1");
  KILN_CHECK(m.decay > 0 && m.heads_weight > 0, "--medusa-decay and --medusa-heads-weight must be > 0");
  set_threads(opt.threads);

  const ModelConfig cfg = load_model_config_for(opt.init);
  ModelOptions mo;
  mo.with_grads = m.joint;
  std::unique_ptr<Model> model = make_model(cfg, mo);
  load_model_weights(opt.init, cfg, model->table(), model->host_params());
  model->params_changed();
  std::unique_ptr<BatchSource> loader = make_batch_source(opt, opt.data, cfg, /*validation=*/false);
  model->plan(opt.batch, opt.seq, RecomputePolicy::parse(opt.recompute), opt.lm_head_chunk);

  // The heads: W = 0, b = 0, every vocabulary head a copy of the LM head (Medusa-1's initialisation).
  const nn::MedusaShape s = medusa_shape(cfg, m.heads);
  const ParamTable table = medusa_param_table(s);
  std::vector<float> params(table.total, 0.0f), grads(table.total, 0.0f);
  nn::MedusaHeads::init_from_lm_head(s, params.data(), lm_head_matrix(cfg, model->table(), model->host_params()));
  // An --init checkpoint that has K heads already: training continues from them.
  if (const auto w = load_medusa_heads(opt.init, cfg); w && w->shape.K == m.heads) {
    std::copy(w->params.begin(), w->params.end(), params.begin());
    std::printf("kiln train: continuing from the %d Medusa heads of %s\n", m.heads, opt.init.c_str());
  }
  nn::MedusaHeads heads{s, params.data(), grads.data()};
  AdamW opt_heads(table, opt.adamw);
  std::unique_ptr<AdamW> opt_base;
  if (m.joint) opt_base = std::make_unique<AdamW>(model->table(), opt.adamw, model->blocks().backend);
  std::printf("kiln train: %d Medusa heads (%.2fM parameters) on %s (%.2fM, %s), decay %.2f%s\n", m.heads,
              double(s.total()) / 1e6, opt.init.c_str(), double(cfg.num_params()) / 1e6,
              m.joint ? "trained jointly" : "frozen", double(m.decay),
              m.joint ? str(", heads' weight ", m.heads_weight).c_str() : "");

  LrSchedule sched;
  sched.kind = LrSchedule::parse(opt.lr_schedule);
  sched.lr = opt.lr;
  sched.min_lr = opt.min_lr;
  sched.warmup = opt.warmup;
  sched.total = opt.steps;
  std::string tokenizer_dir = opt.tokenizer;
  if (tokenizer_dir.empty()) {
    std::error_code ec;
    tokenizer_dir = fs::is_directory(opt.init, ec) ? opt.init : fs::path(opt.init).parent_path().string();
  }
  std::ofstream metrics;
  if (!opt.metrics.empty()) {
    metrics.open(opt.metrics, std::ios::trunc);
    KILN_CHECK(metrics.good(), opt.metrics, ": cannot write the metrics file");
  }

  const int K = m.heads, V = cfg.vocab_size;
  Batch batch;
  nn::MedusaActivations act;
  std::vector<float> logits;
  std::vector<int32_t> tk;
  double last_loss = 0;
  for (int step = 0; step < opt.steps; step++) {
    const auto t0 = Clock::now();
    const float lr = sched.at(step);
    std::vector<double> head_loss(size_t(K), 0.0);
    std::vector<int64_t> head_n(size_t(K), 0), head_hit(size_t(K), 0);
    double base_sum = 0, total = 0;
    int64_t base_n = 0;
    for (int micro = 0; micro < opt.grad_accum; micro++) {
      loader->next(batch);
      const int64_t N = batch.n_tokens;
      const AttentionParams ap = batch.attention(model->attention(batch.B, batch.T));
      const int64_t n_targets = batch.count_targets();
      // Medusa-1: a forward without targets or gradients (the base only supplies h). Medusa-2: the base's loss
      // and its gradient, scaled to the mean over the step's targets.
      const float base_scale = m.joint && n_targets ? 1.0f / float(n_targets * opt.grad_accum) : 0.0f;
      base_sum += model->forward(batch.tokens.data(), batch.pos.data(), m.joint ? batch.targets.data() : nullptr, ap,
                                 base_scale);
      base_n += n_targets;
      const float* h = model->final_hidden();
      logits.resize(size_t(K * N * V));
      tk.resize(size_t(K * N));
      heads.forward(h, N, logits.data(), act);
      medusa_targets(batch.targets.data(), batch.pos.data(), N, K, tk.data());
      for (int k = 0; k < K; k++) {
        int64_t cnt = 0;
        for (int64_t i = 0; i < N; i++) cnt += tk[size_t(k * N + i)] >= 0;
        // d(loss)/d(logits) of λ_k·mean CE_k (times the heads' weight when joint), over the step's micro-batches.
        const double lambda = std::pow(double(m.decay), k + 1) * (m.joint ? m.heads_weight : 1.0);
        const float scale = cnt ? float(lambda / double(cnt * opt.grad_accum)) : 0.0f;
        float* lk = logits.data() + size_t(k) * N * V;
        const nn::CEResult r = nn::softmax_ce(lk, tk.data() + k * N, N, V, scale, lk);
        head_loss[size_t(k)] += r.loss_sum;
        head_n[size_t(k)] += r.count;
        head_hit[size_t(k)] += r.correct;
      }
      heads.backward(h, N, logits.data(), act, m.joint ? model->final_hidden_grad() : nullptr);
      if (m.joint) model->backward();
    }
    if (step == 0 && !m.grads_out.empty()) write_grads(m.grads_out, *model, m.joint, s, grads.data());
    const double norm = opt_heads.grad_norm(grads.data());
    opt_heads.update(params.data(), grads.data(), lr, step + 1, norm, 1.0f, /*zero_grads=*/true);
    double base_norm = 0;
    if (m.joint) {
      const ParamBlocks b = model->blocks();
      base_norm = opt_base->grad_norm(b);
      opt_base->update(b, lr, step + 1, base_norm, 1.0f, /*zero_grads=*/true);
    }
    nlohmann::json j;
    j["step"] = step + 1;
    j["lr"] = lr;
    j["grad_norm"] = norm;
    for (int k = 0; k < K; k++) {
      const double l = head_n[size_t(k)] ? head_loss[size_t(k)] / double(head_n[size_t(k)]) : 0.0;
      total += std::pow(double(m.decay), k + 1) * l;
      j["medusa_loss_" + std::to_string(k + 1)] = l;
      j["medusa_top1_" + std::to_string(k + 1)] = head_n[size_t(k)] ? double(head_hit[size_t(k)]) / double(head_n[size_t(k)]) : 0.0;
    }
    if (m.joint) {
      const double bl = base_n ? base_sum / double(base_n) : 0.0;
      j["base_loss"] = bl;
      j["base_grad_norm"] = base_norm;
      total = bl + m.heads_weight * total;
    }
    j["loss"] = total;
    j["ms"] = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    last_loss = total;
    if (metrics.is_open()) metrics << j.dump() << "\n" << std::flush;
    if (step + 1 == opt.steps || (step + 1) % 10 == 0) {
      std::printf("step %d/%d loss %.4f head-1 top-1 %.3f (%.0f ms)\n", step + 1, opt.steps, total,
                  j["medusa_top1_1"].get<double>(), j["ms"].get<double>());
      std::fflush(stdout);
    }
    if ((opt.save_every > 0 && (step + 1) % opt.save_every == 0) || step + 1 == opt.steps)
      save(opt, *model, s, params.data(), step + 1, tokenizer_dir);
  }
  std::fflush(stdout);
  return last_loss;
}

}  // namespace kiln
