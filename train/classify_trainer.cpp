// The classifier trainer and the judge (train/classify_trainer.h).
#include "train/classify_trainer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "train/checkpoint_dir.h"
#include "train/images.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

double accuracy(ImageModel& m, const ImageSet& s, int batch, int64_t limit = -1) {
  const int64_t n = limit > 0 ? std::min(limit, s.size()) : s.size();
  std::vector<float> logits(size_t(batch) * s.classes);
  int64_t right = 0;
  for (int64_t i = 0; i < n; i += batch) {
    const int b = int(std::min<int64_t>(batch, n - i));
    m.predict(logits.data(), nullptr, s.images.data() + i * s.pixels(), b);
    for (int k = 0; k < b; k++) {
      const float* l = logits.data() + int64_t(k) * s.classes;
      right += int(std::max_element(l, l + s.classes) - l) == s.labels[size_t(i + k)];
    }
  }
  return double(right) / double(n);
}

// Eigenvalues of a symmetric matrix (n×n, row-major; destroyed) by cyclic Jacobi rotations; vectors into V.
void jacobi(std::vector<double>& A, int n, std::vector<double>& eig, std::vector<double>* V) {
  if (V) {
    V->assign(size_t(n) * n, 0.0);
    for (int i = 0; i < n; i++) (*V)[size_t(i) * n + i] = 1;
  }
  for (int sweep = 0; sweep < 100; sweep++) {
    double off = 0;
    for (int i = 0; i < n; i++)
      for (int j = i + 1; j < n; j++) off += A[size_t(i) * n + j] * A[size_t(i) * n + j];
    if (off < 1e-30) break;
    for (int p = 0; p < n; p++)
      for (int q = p + 1; q < n; q++) {
        const double apq = A[size_t(p) * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double theta = (A[size_t(q) * n + q] - A[size_t(p) * n + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1 : -1) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; k++) {  // A ← Jᵀ A J
          const double akp = A[size_t(k) * n + p], akq = A[size_t(k) * n + q];
          A[size_t(k) * n + p] = c * akp - s * akq, A[size_t(k) * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; k++) {
          const double apk = A[size_t(p) * n + k], aqk = A[size_t(q) * n + k];
          A[size_t(p) * n + k] = c * apk - s * aqk, A[size_t(q) * n + k] = s * apk + c * aqk;
        }
        if (V)
          for (int k = 0; k < n; k++) {
            double& vp = (*V)[size_t(k) * n + p];
            double& vq = (*V)[size_t(k) * n + q];
            const double a = vp, b = vq;
            vp = c * a - s * b, vq = s * a + c * b;
          }
      }
  }
  eig.resize(size_t(n));
  for (int i = 0; i < n; i++) eig[size_t(i)] = A[size_t(i) * n + i];
}

void moments(const float* x, int64_t n, int D, std::vector<double>& mu, std::vector<double>& cov) {
  mu.assign(size_t(D), 0), cov.assign(size_t(D) * D, 0);
  for (int64_t i = 0; i < n; i++)
    for (int d = 0; d < D; d++) mu[size_t(d)] += x[i * D + d] / double(n);
  for (int64_t i = 0; i < n; i++)
    for (int a = 0; a < D; a++) {
      const double da = x[i * D + a] - mu[size_t(a)];
      for (int b = 0; b < D; b++) cov[size_t(a) * D + b] += da * (x[i * D + b] - mu[size_t(b)]) / double(n - 1);
    }
}

}  // namespace

double frechet_distance(const float* a, int64_t na, const float* b, int64_t nb, int D) {
  KILN_CHECK(na > 1 && nb > 1, "Fréchet distance: need at least two samples on each side");
  std::vector<double> m1, c1, m2, c2, e, V;
  moments(a, na, D, m1, c1);
  moments(b, nb, D, m2, c2);
  // S = Σ₁^½ from Σ₁'s eigen-decomposition, then the eigenvalues of S·Σ₂·S.
  std::vector<double> A = c1;
  jacobi(A, D, e, &V);
  std::vector<double> S(size_t(D) * D, 0), T(size_t(D) * D, 0), M(size_t(D) * D, 0);
  for (int i = 0; i < D; i++)
    for (int j = 0; j < D; j++)
      for (int k = 0; k < D; k++)
        S[size_t(i) * D + j] += V[size_t(i) * D + k] * std::sqrt(std::max(0.0, e[size_t(k)])) * V[size_t(j) * D + k];
  for (int i = 0; i < D; i++)
    for (int k = 0; k < D; k++)
      for (int j = 0; j < D; j++) T[size_t(i) * D + j] += S[size_t(i) * D + k] * c2[size_t(k) * D + j];
  for (int i = 0; i < D; i++)
    for (int k = 0; k < D; k++)
      for (int j = 0; j < D; j++) M[size_t(i) * D + j] += T[size_t(i) * D + k] * S[size_t(k) * D + j];
  jacobi(M, D, e, nullptr);
  double tr = 0, dm = 0;
  for (int i = 0; i < D; i++) {
    tr += c1[size_t(i) * D + i] + c2[size_t(i) * D + i] - 2 * std::sqrt(std::max(0.0, e[size_t(i)]));
    dm += (m1[size_t(i)] - m2[size_t(i)]) * (m1[size_t(i)] - m2[size_t(i)]);
  }
  return dm + tr;
}

// The resume state of a loss model: one file, <out>/step_NNNNNNNN/train_state.safetensors, holding everything a
// resumed run needs (the weights, the EMA, the AdamW moments; metadata: the step, the trainer's and the model's
// generators), written atomically and pointed at by <out>/latest afterwards, so a kill leaves a whole state.
constexpr const char* kLossState = "train_state.safetensors";

std::string step_dir_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08ld", long(step));
  return name;
}

uint64_t meta_u64(const SafeTensorsReader& r, const std::string& file, const char* key) {
  auto it = r.metadata().find(key);
  KILN_CHECK(it != r.metadata().end(), file, ": metadata ", key, " missing");
  try {
    return std::stoull(it->second);
  } catch (const std::logic_error&) {
    fail(file, ": metadata ", key, " is not an integer ('", it->second, "')");
  }
}

void copy_flat(const SafeTensorsReader& r, const std::string& file, const char* name, float* dst, size_t n) {
  const Tensor* t = r.find(name);
  KILN_CHECK(t, file, ": tensor ", name, " is missing");
  KILN_CHECK(t->dtype == DType::F32 && size_t(t->numel()) == n, file, ": tensor ", name, " has ", t->numel(),
             " values, the model ", n, " (another model?)");
  std::copy_n(static_cast<const float*>(t->data), n, dst);
}

// The mean evaluation loss (a density model's bits/dim) over the first n test images, weighted by batch size.
static double test_loss(ImageModel& m, const ImageSet& test, int batch, int64_t n) {
  n = std::min<int64_t>(n, test.size());
  const int64_t P = test.pixels();
  double s = 0;
  for (int64_t i = 0; i < n; i += batch) {
    const int b = int(std::min<int64_t>(batch, n - i));
    s += m.loss_forward(test.images.data() + i * P, test.labels.data() + i, b, /*train=*/false) * b;
  }
  return s / double(n);
}

double train_classifier(const TrainOptions& opt, const ImageTrainOptions& img, ImageTask task) {
  set_threads(opt.threads);
  KILN_CHECK(!opt.out.empty(), "--objective classify needs --out");
  const ImageSet data = load_images(opt.data, "train");
  ImageSet test;
  const bool dir = fs::is_directory(opt.data);
  if (!opt.val_data.empty())
    test = load_images(opt.val_data, "test");
  else if (dir && has_image_split(opt.data, "test"))
    test = load_images(opt.data, "test");
  else if (dir && has_image_split(opt.data, "val"))
    test = load_images(opt.data, "val");
  KILN_CHECK(data.height == data.width, "images: not square");
  const ImageGeometry g{data.height, data.channels, data.classes};
  ImageModelOptions mo = image_model_options(opt);
  mo.label_smoothing = img.label_smoothing;
  const Augment aug = Augment::parse(img.augment);
  std::unique_ptr<ImageModel> mp =
      make_image_model(image_model_config(opt.model, task, &g), "--model " + opt.model, mo);
  ImageModel& m = *mp;
  KILN_CHECK(m.provides(ImageTask::Classify) || m.provides(ImageTask::Density), "--model ", opt.model, ": a ",
             m.type(), " model computes no loss of its own (classify or density)");
  const bool classify = m.provides(ImageTask::Classify);
  KILN_CHECK(m.provides(task), "--objective ", task == ImageTask::Density ? "nll" : "classify", ": a ", m.type(),
             " model does not provide the ", image_task_name(task), " task");
  const bool ema_on = img.loss_model_ema;
  KILN_CHECK(!ema_on || (img.ema_decay >= 0 && img.ema_decay < 1), "--ema-decay ", img.ema_decay,
             ": must be in [0, 1)");
  m.init_random(opt.seed);
  m.plan(opt.batch, RecomputePolicy::parse(opt.recompute));
  AdamW adam(m.table(), opt.adamw, m.blocks().backend);
  LrSchedule sched;
  sched.kind = LrSchedule::parse(opt.lr_schedule);
  sched.lr = opt.lr, sched.min_lr = opt.min_lr, sched.warmup = opt.warmup, sched.total = opt.steps;
  Rng rng(opt.seed);
  const int64_t P = data.pixels();
  const size_t n = m.table().total;
  std::vector<float> x(size_t(opt.batch) * P);
  std::vector<int32_t> y(size_t(opt.batch));
  int start = 0;
  if (opt.resume) {
    const std::string dir = latest_checkpoint(opt.out);
    KILN_CHECK(!dir.empty(), "--resume: no checkpoint in ", opt.out, " (", opt.out, "/latest is missing)");
    const std::string file = (fs::path(dir) / kLossState).string();
    SafeTensorsReader r(file);
    copy_flat(r, file, "params", m.host_params(), n);
    m.params_changed();
    if (ema_on) {
      KILN_CHECK(r.find("ema"), file, ": no EMA weights (the run was trained without --ema-decay)");
      m.ema().resize(n);
      copy_flat(r, file, "ema", m.ema().data(), n);
    }
    copy_flat(r, file, "adam.m", adam.m(), n);
    copy_flat(r, file, "adam.v", adam.v(), n);
    adam.moments_changed();
    start = int(meta_u64(r, file, "step"));
    rng = Rng(meta_u64(r, file, "rng_seed"), meta_u64(r, file, "rng_position"));
    uint64_t ms, mp;
    if (m.training_rng(ms, mp))
      m.set_training_rng(meta_u64(r, file, "model_rng_seed"), meta_u64(r, file, "model_rng_position"));
    std::fprintf(stderr, "resumed from %s at step %d\n", dir.c_str(), start);
  }
  std::FILE* metrics = opt.metrics.empty() ? nullptr : std::fopen(opt.metrics.c_str(), opt.resume ? "a" : "w");
  KILN_CHECK(opt.metrics.empty() || metrics, "--metrics ", opt.metrics, ": cannot open for writing");
  const bool tty = opt.progress && isatty(2);
  // The model directory, rewritten (atomically) every save_every steps and at the end: config.json,
  // model.safetensors, ema.safetensors (with an EMA; what kiln sample and likelihood read), and the resume state.
  auto save = [&](int64_t step) {
    make_dirs(opt.out);
    write_file_atomic((fs::path(opt.out) / "config.json").string(), m.config_json());
    m.sync_to_host();
    adam.sync_to_host();
    auto tensors = [&](float* block) {
      std::vector<Tensor> ts;
      for (const ParamSpec& s : m.table().specs) ts.push_back({s.name, DType::F32, s.shape, block + s.offset});
      return ts;
    };
    write_safetensors((fs::path(opt.out) / "model.safetensors").string(), tensors(m.host_params()));
    if (ema_on) write_safetensors((fs::path(opt.out) / "ema.safetensors").string(), tensors(m.ema().data()));
    const std::string name = step_dir_name(step);
    make_dirs((fs::path(opt.out) / name).string());
    std::vector<Tensor> st = {{"params", DType::F32, Shape{int64_t(n)}, m.host_params()},
                              {"adam.m", DType::F32, Shape{int64_t(n)}, adam.m()},
                              {"adam.v", DType::F32, Shape{int64_t(n)}, adam.v()}};
    if (ema_on) st.push_back({"ema", DType::F32, Shape{int64_t(n)}, m.ema().data()});
    std::map<std::string, std::string> meta = {{"step", std::to_string(step)},
                                               {"rng_seed", std::to_string(rng.seed())},
                                               {"rng_position", std::to_string(rng.position())}};
    uint64_t ms, mp;
    if (m.training_rng(ms, mp)) meta["model_rng_seed"] = std::to_string(ms), meta["model_rng_position"] = std::to_string(mp);
    write_safetensors((fs::path(opt.out) / name / kLossState).string(), st, meta);
    // Move latest only now that the state is whole; then drop the states beyond keep_checkpoints.
    const std::string tmp = (fs::path(opt.out) / ".latest.tmp").string();
    fs::remove(tmp);
    KILN_CHECK(::symlink(name.c_str(), tmp.c_str()) == 0, tmp, ": cannot create symlink");
    KILN_CHECK(std::rename(tmp.c_str(), (fs::path(opt.out) / "latest").c_str()) == 0, opt.out,
               "/latest: cannot update");
    if (opt.keep_checkpoints > 0) {
      std::vector<std::string> steps;
      for (auto& e : fs::directory_iterator(opt.out))
        if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) steps.push_back(e.path().string());
      std::sort(steps.begin(), steps.end());
      for (size_t i = 0; i + size_t(opt.keep_checkpoints) < steps.size(); i++) fs::remove_all(steps[i]);
    }
  };
  const auto t0 = std::chrono::steady_clock::now();
  double last = 0;
  for (int step = start; step < opt.steps; step++) {
    for (int i = 0; i < opt.batch; i++) {
      const int64_t k = int64_t(rng.below(uint64_t(data.size())));
      std::copy_n(data.images.data() + k * P, P, x.data() + int64_t(i) * P);
      y[size_t(i)] = data.labels[size_t(k)];
    }
    augment_batch(x.data(), opt.batch, data.channels, data.height, data.width, aug, rng);
    last = m.loss_forward(x.data(), y.data(), opt.batch, /*train=*/true);
    m.loss_backward();
    const float lr = sched.at(step);
    const ParamBlocks pb = m.blocks();
    const double norm = adam.grad_norm(pb);
    adam.update(pb, lr, step + 1, norm, 1.0f, true);
    // The EMA starts from the weights after the first update (a flow's actnorms are set from the first batch).
    if (ema_on) {
      if (step == 0)
        m.ema_reset();
      else
        m.ema_update(img.ema_decay);
    }
    nlohmann::json j = {{"step", step + 1}, {"loss", last}, {"lr", lr}, {"grad_norm", norm}};
    if (classify && opt.eval_every > 0 && (step + 1) % opt.eval_every == 0 && test.size() > 0)
      j["test_accuracy_1000"] = accuracy(m, test, opt.batch, 1000);
    if (!classify && opt.eval_every > 0 && (step + 1) % opt.eval_every == 0 && test.size() > 0)
      j["test_loss_1000"] = test_loss(m, test, opt.batch, 1000);
    if (metrics) std::fprintf(metrics, "%s\n", j.dump().c_str()), std::fflush(metrics);
    if (tty) std::fprintf(stderr, "\rstep %d/%d loss %.4f", step + 1, opt.steps, last);
    if (opt.save_every > 0 && (step + 1) % opt.save_every == 0 && step + 1 < opt.steps) save(step + 1);
  }
  if (tty) std::fprintf(stderr, "\n");
  if (metrics) std::fclose(metrics);
  save(std::max(start, opt.steps));
  const double acc = classify && test.size() > 0 ? accuracy(m, test, opt.batch) : std::nan("");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json j = {{"objective", classify ? "classify" : "nll"}, {"steps", opt.steps}, {"loss", last},
                      {"test_images", test.size()}, {"seconds", secs}};
  if (classify) j["test_accuracy"] = acc;
  // A density model: its loss (bits/dim) on the whole test split.
  if (!classify && test.size() > 0) j["test_loss"] = test_loss(m, test, opt.batch, test.size());
  // The same with the EMA weights (what kiln sample and likelihood read unless --raw-weights).
  if (ema_on && test.size() > 0) {
    m.sync_to_host();
    const std::vector<float> raw(m.host_params(), m.host_params() + n);
    std::copy_n(m.ema().data(), n, m.host_params());
    m.params_changed();
    if (classify)
      j["test_accuracy_ema"] = accuracy(m, test, opt.batch);
    else
      j["test_loss_ema"] = test_loss(m, test, opt.batch, test.size());
    std::copy_n(raw.data(), n, m.host_params());
    m.params_changed();
    j["ema_decay"] = img.ema_decay;
  }
  write_file_atomic((fs::path(opt.out) / "eval.json").string(), j.dump(2) + "\n");
  std::printf("%s\n", j.dump().c_str());
  return acc;
}

ImageJudge::ImageJudge(const std::string& dir, int batch) : batch_(batch) {
  const std::string cp = (fs::path(dir) / "config.json").string();
  KILN_CHECK(file_exists(cp), "--judge ", dir, ": no config.json (a directory from kiln train --objective classify)");
  ImageModelOptions mo;
  mo.with_grads = false;
  m_ = make_image_model(read_file(cp), cp, mo);
  KILN_CHECK(m_->provides(ImageTask::Classify), "--judge ", dir, ": a ", m_->type(), " model is not a classifier");
  SafeTensorsReader r((fs::path(dir) / "model.safetensors").string());
  for (const ParamSpec& s : m_->table().specs) {
    const Tensor& t = r.get(s.name);
    KILN_CHECK(t.numel() == s.numel(), dir, "/model.safetensors: tensor ", s.name, " has the wrong size");
    convert_to_f32(t.data, t.dtype, m_->host_params() + s.offset, size_t(s.numel()));
  }
  m_->params_changed();
  m_->plan(batch);
}

ImageJudge::~ImageJudge() = default;

int ImageJudge::feature_dim() const { return m_->feature_dim(); }

void ImageJudge::run(const float* images, int64_t n, int32_t* pred, float* features) {
  const ImageGeometry g = m_->geometry();
  const int64_t P = m_->pixels();
  const int D = m_->feature_dim();
  std::vector<float> logits(size_t(batch_) * g.classes);
  for (int64_t i = 0; i < n; i += batch_) {
    const int b = int(std::min<int64_t>(batch_, n - i));
    m_->predict(logits.data(), features ? features + i * D : nullptr, images + i * P, b);
    if (pred)
      for (int k = 0; k < b; k++) {
        const float* l = logits.data() + int64_t(k) * g.classes;
        pred[i + k] = int32_t(std::max_element(l, l + g.classes) - l);
      }
  }
}

}  // namespace kiln
