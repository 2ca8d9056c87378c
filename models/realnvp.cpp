// The RealNVP flow of models/realnvp.h: the layer list, and each layer's forward, backward and inverse.
#include "models/realnvp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/flow.h"
#include "models/image_config.h"

namespace kiln {

void RealNVPConfig::validate() const {
  KILN_CHECK(image_size > 0 && channels > 0, "realnvp: image_size and channels must be positive");
  KILN_CHECK(scales >= 0 && scales <= 6, "realnvp: field scales ", scales, " must be in [0, 6]");
  KILN_CHECK(image_size % (1 << scales) == 0, "realnvp: field image_size ", image_size, " must divide by 2^scales = ",
             1 << scales);
  KILN_CHECK(couplings >= 0 && final_couplings >= 0, "realnvp: couplings and final_couplings must be non-negative");
  KILN_CHECK(hidden > 0, "realnvp: field hidden must be positive");
  KILN_CHECK(depth >= 1, "realnvp: field depth ", depth, " must be at least 1");
  // The last scale's checkerboard needs two positions; the first channel coupling two channels (4C after a squeeze).
  KILN_CHECK(final_couplings == 0 || (image_size >> scales) * (image_size >> scales) >= 2,
             "realnvp: the last scale is a single pixel; use fewer scales or final_couplings 0");
}

std::string RealNVPConfig::to_json() const {
  nlohmann::json j = {{"model_type", "realnvp"}, {"image_size", image_size}, {"channels", channels},
                      {"classes", classes},      {"scales", scales},         {"couplings", couplings},
                      {"final_couplings", final_couplings}, {"hidden", hidden}, {"depth", depth},
                      {"additive", additive}};
  return j.dump(2) + "\n";
}

RealNVPConfig RealNVPConfig::from_json(const std::string& text, const std::string& where) {
  const ImageConfigReader r(text, where, "realnvp");
  RealNVPConfig c;
  auto get = [&](const char* k, int& v) { r.get(k, v); };
  get("image_size", c.image_size), get("channels", c.channels), get("classes", c.classes);
  get("scales", c.scales), get("couplings", c.couplings), get("final_couplings", c.final_couplings);
  get("hidden", c.hidden), get("depth", c.depth);
  if (r.json().contains("additive")) {
    KILN_CHECK(r.json()["additive"].is_boolean(), where, ": field additive must be true or false");
    c.additive = r.json()["additive"].get<bool>();
  }
  c.validate();
  return c;
}

struct RealNVP::Layer {
  enum Kind { ActNorm, Coupling, Squeeze, FactorOut } kind;
  int C = 0, H = 0, W = 0;  // input shape
  int64_t n = 0;            // input values per sample
  // actnorm
  size_t logs = 0, bias = 0;
  // coupling: conditioning set A, transformed set T (the header's B), MLP widths and tensors
  std::vector<int32_t> A, T;
  std::vector<int> dims;          // |A|, hidden × depth, out
  std::vector<size_t> w, b;       // offsets of each linear's weight and bias
  size_t scale = 0;
  // factor out: the first half goes to z at zoff (squeeze is pixel_unshuffle: y[c·4 + 2·di + dj, i, j] =
  // x[c, 2i + di, 2j + dj])
  int64_t zoff = 0;
  size_t id = 0;  // index in layers_ (the buffers of this layer)
  int64_t out_n() const { return kind == FactorOut ? n / 2 : n; }
};

// The flow's buffers in the backend's memory (the host's on the CPU backend): on a device backend the weights'
// copies (fp32, their bf16 copy, the gradients, in ParamTable layout); every coupling's index sets; and for
// batches of up to `cap` each layer's input, the latents and their gradient, the log-dets, the loss weights,
// two fp32 buffers that the backward's gradient and the inverse's values alternate between, and per coupling
// the MLP's activations (the backend's activation type; the last linear's output fp32).
struct RealNVP::Buffers {
  explicit Buffers(nn::Backend& b) : be(b) {}
  ~Buffers() {
    free_batch();
    for (void* p : fixed) be.free(p);
  }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
  nn::Backend& be;
  std::vector<void*> fixed, batch;
  float* params = nullptr;  // null on the host backend (params_ and grads_ are used in place)
  float* grads = nullptr;
  uint16_t* w16 = nullptr;
  struct Mlp {
    const int32_t *A = nullptr, *T = nullptr;
    void* xa = nullptr;
    std::vector<void*> pre, post;  // hidden layers: pre-activation and activation
    float* out = nullptr;
  };
  std::vector<Mlp> mlp;     // by layer index
  std::vector<float*> in;   // in[l]: layer l's input; in[layers]: the last layer's output
  float *z = nullptr, *dz = nullptr, *g0 = nullptr, *g1 = nullptr;
  double *logdet = nullptr, *w = nullptr;
  void *da = nullptr, *db = nullptr;  // the MLP backward's gradients, [cap · widest]
  int cap = 0;
  void* get(std::vector<void*>& owner, int64_t n, size_t elem) {
    void* p = be.alloc(size_t(std::max<int64_t>(n, 1)) * elem, "realnvp");
    owner.push_back(p);
    return p;
  }
  template <class T>
  T* get(std::vector<void*>& owner, int64_t n) {
    return static_cast<T*>(get(owner, n, sizeof(T)));
  }
  nn::Act act(void* p) const { return {p, be.act_dtype()}; }
  void free_batch() {
    for (void* p : batch) be.free(p);
    batch.clear();
  }
  // The index sets, once.
  void init(const std::vector<Layer>& layers) {
    mlp.assign(layers.size(), {});
    for (const Layer& l : layers) {
      if (l.kind != Layer::Coupling) continue;
      int32_t* A = get<int32_t>(fixed, int64_t(l.A.size()));
      int32_t* T = get<int32_t>(fixed, int64_t(l.T.size()));
      be.upload(A, l.A.data(), l.A.size() * 4);
      be.upload(T, l.T.data(), l.T.size() * 4);
      mlp[l.id].A = A, mlp[l.id].T = T;
    }
  }
  // Sizes the per-batch buffers for B samples of P values (reallocated only when B grows).
  void reserve(const std::vector<Layer>& layers, int B, int64_t P) {
    if (B <= cap) return;
    free_batch();
    cap = B;
    const size_t ae = dtype_size(be.act_dtype());
    int64_t widest = 1;
    in.clear();
    for (const Layer& l : layers) {
      in.push_back(get<float>(batch, B * l.n));
      if (l.kind != Layer::Coupling) continue;
      Mlp& m = mlp[l.id];
      const size_t L = l.dims.size() - 1;
      m.xa = get(batch, int64_t(B) * l.dims[0], ae);
      m.pre.clear(), m.post.clear();
      for (size_t k = 0; k + 1 < L; k++) {
        m.pre.push_back(get(batch, int64_t(B) * l.dims[k + 1], ae));
        m.post.push_back(get(batch, int64_t(B) * l.dims[k + 1], ae));
      }
      m.out = get<float>(batch, int64_t(B) * l.dims.back());
      for (int d : l.dims) widest = std::max<int64_t>(widest, d);
    }
    in.push_back(get<float>(batch, B * (layers.empty() ? P : layers.back().out_n())));
    z = get<float>(batch, B * P), dz = get<float>(batch, B * P);
    g0 = get<float>(batch, B * P), g1 = get<float>(batch, B * P);
    logdet = get<double>(batch, B), w = get<double>(batch, B);
    da = get(batch, widest * B, ae), db = get(batch, widest * B, ae);
  }
};

RealNVP::~RealNVP() = default;

RealNVP::RealNVP(const RealNVPConfig& cfg, nn::Backend& be) : cfg_(cfg), be_(be) {
  cfg_.validate();
  KILN_CHECK(be_.on_host() || be_.lowp() == LowpType::BF16,
             "realnvp: a device backend must run bf16 products (got ", be_.name(), ")");
  int C = cfg_.channels, H = cfg_.image_size, W = cfg_.image_size;
  int64_t zoff = 0;
  auto name = [&](const std::string& s) { return "layers." + std::to_string(layers_.size()) + "." + s; };
  auto actnorm = [&] {
    Layer l{Layer::ActNorm};
    l.C = C, l.H = H, l.W = W, l.n = int64_t(C) * H * W;
    table_.add(name("logs"), name("logs"), Shape{C});
    l.logs = table_.specs.back().offset;
    table_.add(name("bias"), name("bias"), Shape{C});
    l.bias = table_.specs.back().offset;
    layers_.push_back(std::move(l));
  };
  // in_A(c, i, j): whether value (c, i, j) conditions.
  auto coupling = [&](auto in_A) {
    actnorm();
    Layer l{Layer::Coupling};
    l.C = C, l.H = H, l.W = W, l.n = int64_t(C) * H * W;
    for (int c = 0; c < C; c++)
      for (int i = 0; i < H; i++)
        for (int j = 0; j < W; j++) (in_A(c, i, j) ? l.A : l.T).push_back(int32_t((c * H + i) * W + j));
    const int out = int(l.T.size()) * (cfg_.additive ? 1 : 2);
    l.dims.push_back(int(l.A.size()));
    for (int k = 0; k < cfg_.depth; k++) l.dims.push_back(cfg_.hidden);
    l.dims.push_back(out);
    for (size_t k = 0; k + 1 < l.dims.size(); k++) {
      const std::string m = "mlp." + std::to_string(k) + ".";
      table_.add(name(m + "weight"), name(m + "weight"), Shape{l.dims[k + 1], l.dims[k]});
      l.w.push_back(table_.specs.back().offset);
      table_.add(name(m + "bias"), name(m + "bias"), Shape{l.dims[k + 1]});
      l.b.push_back(table_.specs.back().offset);
    }
    if (!cfg_.additive) {
      table_.add(name("scale"), name("scale"), Shape{int64_t(l.T.size())});
      l.scale = table_.specs.back().offset;
    }
    l.id = layers_.size();
    layers_.push_back(std::move(l));
  };
  auto checkerboard = [&](int parity) { coupling([parity](int, int i, int j) { return (i + j) % 2 == parity; }); };
  auto channel = [&](bool first) {
    const int half = C / 2;
    coupling([first, half](int c, int, int) { return first ? c < half : c >= half; });
  };
  for (int s = 0; s < cfg_.scales; s++) {
    for (int k = 0; k < cfg_.couplings; k++) checkerboard(k % 2);
    Layer q{Layer::Squeeze};
    q.C = C, q.H = H, q.W = W, q.n = int64_t(C) * H * W;
    layers_.push_back(std::move(q));
    C *= 4, H /= 2, W /= 2;
    for (int k = 0; k < cfg_.couplings; k++) channel(k % 2 == 0);
    Layer f{Layer::FactorOut};
    f.C = C, f.H = H, f.W = W, f.n = int64_t(C) * H * W, f.zoff = zoff;
    layers_.push_back(std::move(f));
    zoff += int64_t(C / 2) * H * W;
    C /= 2;
  }
  for (int k = 0; k < cfg_.final_couplings; k++) checkerboard(k % 2);
  KILN_CHECK(zoff + int64_t(C) * H * W == cfg_.pixels(), "realnvp: latent size mismatch");
  // 1 once init_actnorm ran (kept in checkpoints, so a loaded model is not initialised again); no gradient.
  table_.add("actnorm_initialized", "actnorm_initialized", Shape{1});
  table_.specs.back().trainable = false;
  init_flag_ = table_.specs.back().offset;
  params_.assign(table_.total, 0.0f);
  grads_.assign(table_.total, 0.0f);
  buf_ = std::make_unique<Buffers>(be_);
  if (!be_.on_host()) {
    buf_->params = buf_->get<float>(buf_->fixed, int64_t(table_.total));
    buf_->grads = buf_->get<float>(buf_->fixed, int64_t(table_.total));
    buf_->w16 = buf_->get<uint16_t>(buf_->fixed, int64_t(table_.total));
    be_.memset(buf_->grads, 0, table_.total * 4);
  }
  buf_->init(layers_);
}

void RealNVP::init_random(uint64_t seed) {
  Rng r(seed);
  std::fill(params_.begin(), params_.end(), 0.0f);
  for (const Layer& l : layers_) {
    if (l.kind != Layer::Coupling) continue;
    // Xavier-uniform hidden layers; the output layer stays zero (the coupling starts as the identity).
    for (size_t k = 0; k + 2 < l.dims.size(); k++) {
      const int in = l.dims[k], out = l.dims[k + 1];
      const float a = std::sqrt(6.0f / float(in + out));
      for (int64_t i = 0; i < int64_t(in) * out; i++) params_[l.w[k] + size_t(i)] = (2 * r.uniform() - 1) * a;
    }
  }
}

void RealNVP::zero_grad() { std::fill(grads_.begin(), grads_.end(), 0.0f); }

namespace {

nn::Act f32(float* p) { return {p, DType::F32}; }
nn::Act f32(const float* p) { return {const_cast<float*>(p), DType::F32}; }

}  // namespace

float* RealNVP::dparams() { return buf_->params ? buf_->params : params_.data(); }
float* RealNVP::dgrads() { return buf_->grads ? buf_->grads : grads_.data(); }

FlowCoupling RealNVP::coupling(const Layer& l, int B) const {
  FlowCoupling c;
  c.B = B, c.n = l.n, c.A = buf_->mlp[l.id].A, c.T = buf_->mlp[l.id].T;
  c.nA = int(l.A.size()), c.nT = int(l.T.size()), c.additive = cfg_.additive;
  return c;
}

// ---- the couplings' MLPs: forward and backward, in the backend's activations ----

void RealNVP::sync_weights() {
  if (!buf_->params) return;
  be_.upload(buf_->params, params_.data(), params_.size() * 4);
  be_.to_lowp(buf_->w16, buf_->params, int64_t(params_.size()), LowpType::BF16);
}

nn::Weight RealNVP::weight(const Layer& l, int k, bool grads) {
  nn::Weight w;
  const float* p = dparams();
  w.w = p + l.w[size_t(k)], w.b = p + l.b[size_t(k)];
  if (grads) w.dw = dgrads() + l.w[size_t(k)], w.db = dgrads() + l.b[size_t(k)];
  if (buf_->w16) w.w16 = buf_->w16 + l.w[size_t(k)];
  w.in = l.dims[size_t(k)], w.out = l.dims[size_t(k) + 1];
  return w;
}

// The MLP on the gathered x_A (mlp.xa) into mlp.out (fp32), keeping the hidden activations.
void RealNVP::mlp_forward(const Layer& l, int B) {
  const int L = int(l.dims.size()) - 1;
  Buffers::Mlp& m = buf_->mlp[l.id];
  nn::Act h = buf_->act(m.xa);
  for (int k = 0; k < L; k++) {
    const nn::Weight w = weight(l, k, false);
    if (k + 1 == L) {
      be_.linear_forward(f32(m.out), h, w, B);
      break;
    }
    const nn::Act pre = buf_->act(m.pre[size_t(k)]), post = buf_->act(m.post[size_t(k)]);
    be_.linear_forward(pre, h, w, B);
    be_.activation_forward(post, pre, int64_t(B) * w.out, Activation::GeluTanh);
    h = post;
  }
}

// From d(out) in buf_->da to d(x_A) in buf_->db, accumulating the parameter gradients: da holds the gradient
// entering linear k, db the one leaving it.
void RealNVP::mlp_backward(const Layer& l, int B) {
  const int L = int(l.dims.size()) - 1;
  Buffers::Mlp& m = buf_->mlp[l.id];
  const nn::Act da = buf_->act(buf_->da), db = buf_->act(buf_->db);
  for (int k = L - 1; k >= 0; k--) {
    const nn::Weight w = weight(l, k, true);
    be_.linear_backward(db, da, buf_->act(k == 0 ? m.xa : m.post[size_t(k) - 1]), w, B);
    if (k > 0) be_.activation_backward(da, buf_->act(m.pre[size_t(k) - 1]), db, int64_t(B) * w.in, Activation::GeluTanh);
  }
}

// ---- forward (and the actnorm init, which runs the forward) ----

void RealNVP::run_forward(const float* x, int B, bool init) {
  KILN_CHECK(B > 0, "realnvp: batch ", B, " must be positive");
  const int64_t P = cfg_.pixels();
  B_ = B;
  sync_weights();
  Buffers& d = *buf_;
  d.reserve(layers_, B, P);
  be_.upload(d.in[0], x, size_t(B * P) * 4);
  be_.memset(d.logdet, 0, size_t(B) * 8);
  float* prm = dparams();
  for (size_t li = 0; li < layers_.size(); li++) {
    const Layer& l = layers_[li];
    const float* cur = d.in[li];
    float* y = d.in[li + 1];
    const int64_t n = l.n;
    if (l.kind == Layer::ActNorm) {
      const int64_t hw = int64_t(l.H) * l.W;
      if (init) {
        be_.actnorm_init(prm + l.logs, prm + l.bias, cur, B, l.C, hw);
        if (d.params) {  // the host's master copy
          be_.download(params_.data() + l.logs, prm + l.logs, size_t(l.C) * 4);
          be_.download(params_.data() + l.bias, prm + l.bias, size_t(l.C) * 4);
        }
      }
      be_.actnorm_forward(y, d.logdet, cur, prm + l.logs, prm + l.bias, B, l.C, hw);
    } else if (l.kind == Layer::Coupling) {
      const FlowCoupling c = coupling(l, B);
      be_.flow_gather(d.act(d.mlp[l.id].xa), cur, c);
      mlp_forward(l, B);
      be_.coupling_forward(y, d.logdet, cur, d.mlp[l.id].out, cfg_.additive ? nullptr : prm + l.scale, c);
    } else if (l.kind == Layer::Squeeze) {
      be_.pixel_unshuffle(y, cur, B, l.C, l.H / 2, l.W / 2, 2);
    } else {  // factor out
      const int64_t h = n / 2;
      be_.copy_rows(f32(d.z + l.zoff), P, f32(cur), n, B, h);
      be_.copy_rows(f32(y), h, f32(cur + h), n, B, h);
    }
  }
  // What is left is the last part of z.
  const int64_t left = layers_.empty() ? P : layers_.back().out_n();
  be_.copy_rows(f32(d.z + (P - left)), P, f32(d.in.back()), left, B, left);
  z_.resize(size_t(B * P)), logdet_.resize(size_t(B));
  be_.download(z_.data(), d.z, z_.size() * 4);
  be_.download(logdet_.data(), d.logdet, logdet_.size() * 8);
}

void RealNVP::init_actnorm(const float* x, int B) {
  run_forward(x, B, true);
  params_[init_flag_] = 1.0f;
}

bool RealNVP::actnorm_initialized() const { return params_[init_flag_] != 0.0f; }

void RealNVP::forward(double* logp, const float* x, int B, float* z, double* logdet) {
  run_forward(x, B, false);
  const int64_t P = cfg_.pixels();
  for (int b = 0; b < B; b++) {
    double q = 0;
    for (int64_t i = 0; i < P; i++) q += double(z_[size_t(b * P + i)]) * z_[size_t(b * P + i)];
    logp[b] = -0.5 * q - 0.5 * double(P) * std::log(2 * M_PI) + logdet_[size_t(b)];
    if (logdet) logdet[b] = logdet_[size_t(b)];
  }
  if (z) std::memcpy(z, z_.data(), z_.size() * 4);
}

// ---- backward ----

void RealNVP::backward(const double* wts, float* dx_out) {
  KILN_CHECK(B_ > 0, "realnvp backward: no forward to differentiate");
  const int B = B_;
  const int64_t P = cfg_.pixels();
  Buffers& d = *buf_;
  // d(w·log N(z))/dz = −w·z; the log-det's weight is w itself.
  std::vector<float> dz(z_.size());
  for (int b = 0; b < B; b++)
    for (int64_t i = 0; i < P; i++) dz[size_t(b * P + i)] = float(-wts[b] * z_[size_t(b * P + i)]);
  be_.upload(d.dz, dz.data(), dz.size() * 4);
  be_.upload(d.w, wts, size_t(B) * 8);
  double wsum = 0;
  for (int b = 0; b < B; b++) wsum += wts[b];
  const float* prm = dparams();
  float* grd = dgrads();
  const int64_t left = layers_.empty() ? P : layers_.back().out_n();
  float *dy = d.g0, *dx = d.g1;
  be_.copy_rows(f32(dy), left, f32(d.dz + (P - left)), P, B, left);
  for (size_t li = layers_.size(); li-- > 0;) {
    const Layer& l = layers_[li];
    const float* x = d.in[li];
    const int64_t n = l.n;
    if (l.kind == Layer::ActNorm) {
      be_.actnorm_backward(dx, grd + l.logs, grd + l.bias, dy, x, prm + l.logs, wsum, B, l.C, int64_t(l.H) * l.W);
    } else if (l.kind == Layer::Coupling) {
      // d(MLP out) into da; x_A passes through, and the MLP's gradient joins it at A.
      const FlowCoupling c = coupling(l, B);
      const bool aff = !cfg_.additive;
      be_.coupling_backward(dx, d.act(d.da), aff ? grd + l.scale : nullptr, dy, x, d.mlp[l.id].out,
                            aff ? prm + l.scale : nullptr, d.w, c);
      mlp_backward(l, B);
      be_.flow_gather_backward(dx, d.act(d.db), c);
    } else if (l.kind == Layer::Squeeze) {
      be_.pixel_shuffle(dx, dy, B, l.C, l.H / 2, l.W / 2, 2);
    } else {
      const int64_t h = n / 2;
      be_.copy_rows(f32(dx), n, f32(d.dz + l.zoff), P, B, h);
      be_.copy_rows(f32(dx + h), n, f32(dy), h, B, h);
    }
    std::swap(dy, dx);
  }
  if (dx_out) be_.download(dx_out, dy, size_t(B * P) * 4);
  if (d.grads) {
    // The gradients accumulated on the device: into the host's, and the device's start again from zero.
    std::vector<float> g(grads_.size());
    be_.download(g.data(), d.grads, g.size() * 4);
    for (size_t i = 0; i < g.size(); i++) grads_[i] += g[i];
    be_.memset(d.grads, 0, g.size() * 4);
  }
}

// ---- inverse ----

void RealNVP::inverse(float* x_out, const float* z, int B) {
  KILN_CHECK(B > 0, "realnvp: batch ", B, " must be positive");
  const int64_t P = cfg_.pixels();
  const int64_t left = layers_.empty() ? P : layers_.back().out_n();
  B_ = 0;  // the MLPs' kept activations are the inverse's now: no backward until the next forward
  sync_weights();
  Buffers& d = *buf_;
  d.reserve(layers_, B, P);
  be_.upload(d.z, z, size_t(B * P) * 4);
  const float* prm = dparams();
  float *y = d.g0, *x = d.g1;
  be_.copy_rows(f32(y), left, f32(d.z + (P - left)), P, B, left);
  for (size_t li = layers_.size(); li-- > 0;) {
    const Layer& l = layers_[li];
    const int64_t n = l.n;
    if (l.kind == Layer::ActNorm) {
      be_.actnorm_inverse(x, y, prm + l.logs, prm + l.bias, B, l.C, int64_t(l.H) * l.W);
    } else if (l.kind == Layer::Coupling) {
      // x_A = y_A, so the MLP sees the same input as in the forward.
      const FlowCoupling c = coupling(l, B);
      be_.flow_gather(d.act(d.mlp[l.id].xa), y, c);
      mlp_forward(l, B);
      be_.coupling_inverse(x, y, d.mlp[l.id].out, cfg_.additive ? nullptr : prm + l.scale, c);
    } else if (l.kind == Layer::Squeeze) {
      be_.pixel_shuffle(x, y, B, l.C, l.H / 2, l.W / 2, 2);
    } else {
      const int64_t h = n / 2;
      be_.copy_rows(f32(x), n, f32(d.z + l.zoff), P, B, h);
      be_.copy_rows(f32(x + h), n, f32(y), h, B, h);
    }
    std::swap(y, x);
  }
  be_.download(x_out, y, size_t(B * P) * 4);
}

}  // namespace kiln
