// The RealNVP flow of models/realnvp.h: the layer list, and each layer's forward, backward and inverse.
#include "models/realnvp.h"

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
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
  // squeeze: y[k] = x[perm[k]]
  std::vector<int32_t> perm;
  // factor out: the first half goes to z at zoff
  int64_t zoff = 0;
  // The last forward's coupling activations: the gathered x_A, each linear's output (pre) and activation (post)
  // on the host backend, and the MLP's output (s̃ then t; or t) on every backend.
  std::vector<float> xa, out;
  std::vector<std::vector<float>> pre, post;
  size_t id = 0;  // index in layers_ (the device's buffers of this layer)
  int64_t out_n() const { return kind == FactorOut ? n / 2 : n; }
};

// A device backend's buffers: the weights (fp32, their bf16 copy, the gradients, in ParamTable layout) and, per
// coupling, the MLP's activations for batches of up to `cap` (bf16; the last linear's output fp32), with scratch.
struct RealNVP::Device {
  explicit Device(nn::Backend& b) : be(b) {}
  ~Device() {
    free_batch();
    for (void* p : fixed) be.free(p);
  }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  nn::Backend& be;
  std::vector<void*> fixed, batch;
  float* params = nullptr;
  float* grads = nullptr;
  uint16_t* w16 = nullptr;
  struct Mlp {
    uint16_t* xa = nullptr;
    std::vector<uint16_t*> pre, post;  // hidden layers: pre-activation and activation
    float* out = nullptr;
  };
  std::vector<Mlp> mlp;  // by layer index
  float* stage = nullptr;  // fp32 [cap · widest]: host values on their way to bf16
  uint16_t *da = nullptr, *db = nullptr;  // bf16 [cap · widest]: the backward's gradients
  int cap = 0;
  template <class T>
  T* get(std::vector<void*>& owner, int64_t n) {
    void* p = be.alloc(size_t(std::max<int64_t>(n, 1)) * sizeof(T), "realnvp");
    owner.push_back(p);
    return static_cast<T*>(p);
  }
  void free_batch() {
    for (void* p : batch) be.free(p);
    batch.clear();
  }
  // Sizes the per-batch buffers for B images (reallocated only when B grows).
  void reserve(const std::vector<Layer>& layers, int B) {
    if (B <= cap) return;
    free_batch();
    cap = B;
    mlp.assign(layers.size(), {});
    int64_t widest = 1;
    for (const Layer& l : layers) {
      if (l.kind != Layer::Coupling) continue;
      Mlp& m = mlp[l.id];
      const size_t L = l.dims.size() - 1;
      m.xa = get<uint16_t>(batch, int64_t(B) * l.dims[0]);
      for (size_t k = 0; k + 1 < L; k++) {
        m.pre.push_back(get<uint16_t>(batch, int64_t(B) * l.dims[k + 1]));
        m.post.push_back(get<uint16_t>(batch, int64_t(B) * l.dims[k + 1]));
      }
      m.out = get<float>(batch, int64_t(B) * l.dims.back());
      for (int d : l.dims) widest = std::max<int64_t>(widest, d);
    }
    stage = get<float>(batch, widest * B);
    da = get<uint16_t>(batch, widest * B), db = get<uint16_t>(batch, widest * B);
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
    for (int c = 0; c < C; c++)
      for (int di = 0; di < 2; di++)
        for (int dj = 0; dj < 2; dj++)
          for (int i = 0; i < H / 2; i++)
            for (int j = 0; j < W / 2; j++) q.perm.push_back(int32_t((c * H + 2 * i + di) * W + 2 * j + dj));
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
  if (!be_.on_host()) {
    dev_ = std::make_unique<Device>(be_);
    dev_->params = dev_->get<float>(dev_->fixed, int64_t(table_.total));
    dev_->grads = dev_->get<float>(dev_->fixed, int64_t(table_.total));
    dev_->w16 = dev_->get<uint16_t>(dev_->fixed, int64_t(table_.total));
    be_.memset(dev_->grads, 0, table_.total * 4);
  }
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

nn::Act act(float* p) { return {p, DType::F32}; }
nn::Act act(const float* p) { return {const_cast<float*>(p), DType::F32}; }

}  // namespace

// ---- the couplings' MLPs: forward and backward, on the host or on the device ----

void RealNVP::sync_weights() {
  if (!dev_) return;
  be_.upload(dev_->params, params_.data(), params_.size() * 4);
  be_.to_lowp(dev_->w16, dev_->params, int64_t(params_.size()), LowpType::BF16);
}

void RealNVP::mlp_forward(Layer& l, int B) {
  const int L = int(l.dims.size()) - 1;
  auto weight = [&](int k) {
    nn::Weight w;
    const float* p = dev_ ? dev_->params : params_.data();
    w.w = p + l.w[size_t(k)], w.b = p + l.b[size_t(k)];
    if (dev_) w.w16 = dev_->w16 + l.w[size_t(k)];
    w.in = l.dims[size_t(k)], w.out = l.dims[size_t(k) + 1];
    return w;
  };
  l.out.resize(size_t(B) * size_t(l.dims.back()));
  if (!dev_) {
    l.pre.resize(size_t(L)), l.post.resize(size_t(L));
    const float* h = l.xa.data();
    for (int k = 0; k < L; k++) {
      const nn::Weight w = weight(k);
      l.pre[size_t(k)].resize(static_cast<size_t>(B) * w.out);
      be_.linear_forward(act(l.pre[size_t(k)].data()), act(h), w, B);
      if (k + 1 < L) {
        l.post[size_t(k)].resize(l.pre[size_t(k)].size());
        be_.activation_forward(act(l.post[size_t(k)].data()), act(l.pre[size_t(k)].data()),
                               int64_t(l.pre[size_t(k)].size()), Activation::GeluTanh);
        h = l.post[size_t(k)].data();
      }
    }
    l.out = l.pre.back();
    return;
  }
  // Device: x_A to bf16 there, the hidden layers in bf16, the last linear's output in fp32 back to the host.
  dev_->reserve(layers_, B);
  Device::Mlp& m = dev_->mlp[l.id];
  be_.upload(dev_->stage, l.xa.data(), l.xa.size() * 4);
  be_.to_lowp(m.xa, dev_->stage, int64_t(l.xa.size()), LowpType::BF16);
  const uint16_t* h = m.xa;
  auto bf = [](const uint16_t* p) { return nn::Act{const_cast<uint16_t*>(p), DType::BF16}; };
  for (int k = 0; k < L; k++) {
    const nn::Weight w = weight(k);
    if (k + 1 < L) {
      be_.linear_forward(bf(m.pre[size_t(k)]), bf(h), w, B);
      be_.activation_forward(bf(m.post[size_t(k)]), bf(m.pre[size_t(k)]), int64_t(B) * w.out, Activation::GeluTanh);
      h = m.post[size_t(k)];
    } else {
      be_.linear_forward(act(m.out), bf(h), w, B);
    }
  }
  be_.download(l.out.data(), m.out, l.out.size() * 4);
}

void RealNVP::mlp_backward(Layer& l, int B, const std::vector<float>& dout, std::vector<float>& dxa) {
  const int L = int(l.dims.size()) - 1;
  auto weight = [&](int k) {
    nn::Weight w;
    const float* p = dev_ ? dev_->params : params_.data();
    float* g = dev_ ? dev_->grads : grads_.data();
    w.w = p + l.w[size_t(k)], w.b = p + l.b[size_t(k)];
    w.dw = g + l.w[size_t(k)], w.db = g + l.b[size_t(k)];
    if (dev_) w.w16 = dev_->w16 + l.w[size_t(k)];
    w.in = l.dims[size_t(k)], w.out = l.dims[size_t(k) + 1];
    return w;
  };
  if (!dev_) {
    // Linear k reads h_k (x_A, then the activations).
    std::vector<float> dpre = dout;
    for (int k = L - 1; k >= 0; k--) {
      const nn::Weight w = weight(k);
      const float* h = k == 0 ? l.xa.data() : l.post[size_t(k) - 1].data();
      dxa.assign(static_cast<size_t>(B) * w.in, 0.0f);
      be_.linear_backward(act(dxa.data()), act(dpre.data()), act(h), w, B);
      if (k > 0) {
        dpre.assign(dxa.size(), 0.0f);
        be_.activation_backward(act(dpre.data()), act(l.pre[size_t(k) - 1].data()), act(dxa.data()),
                                int64_t(dxa.size()), Activation::GeluTanh);
      }
    }
    return;
  }
  // Device: dout to bf16 there; da holds the gradient entering linear k, db the one leaving it.
  Device::Mlp& m = dev_->mlp[l.id];
  auto bf = [](uint16_t* p) { return nn::Act{p, DType::BF16}; };
  be_.upload(dev_->stage, dout.data(), dout.size() * 4);
  be_.to_lowp(dev_->da, dev_->stage, int64_t(dout.size()), LowpType::BF16);
  for (int k = L - 1; k >= 0; k--) {
    const nn::Weight w = weight(k);
    uint16_t* h = k == 0 ? m.xa : m.post[size_t(k) - 1];
    be_.linear_backward(bf(dev_->db), bf(dev_->da), bf(h), w, B);
    if (k > 0)
      be_.activation_backward(bf(dev_->da), bf(m.pre[size_t(k) - 1]), bf(dev_->db), int64_t(B) * w.in,
                              Activation::GeluTanh);
  }
  std::vector<uint16_t> d16(static_cast<size_t>(B) * l.dims[0]);
  be_.download(d16.data(), dev_->db, d16.size() * 2);
  dxa.resize(d16.size());
  for (size_t i = 0; i < d16.size(); i++) dxa[i] = bf16_to_f32(d16[i]);
}

// ---- forward (and the actnorm init, which runs the forward) ----

void RealNVP::run_forward(const float* x, int B, bool init) {
  KILN_CHECK(B > 0, "realnvp: batch ", B, " must be positive");
  const int64_t P = cfg_.pixels();
  B_ = B;
  sync_weights();
  in_.resize(layers_.size());
  z_.assign(size_t(B * P), 0.0f);
  logdet_.assign(static_cast<size_t>(B), 0.0);
  std::vector<float> cur(x, x + B * P);
  for (size_t li = 0; li < layers_.size(); li++) {
    Layer& l = layers_[li];
    in_[li] = cur;
    const int64_t n = l.n;
    std::vector<float> y(size_t(B * l.out_n()));
    if (l.kind == Layer::ActNorm) {
      const int64_t hw = int64_t(l.H) * l.W;
      float* logs = params_.data() + l.logs;
      float* bias = params_.data() + l.bias;
      if (init) {
        // Zero mean, unit variance per channel over the batch and the positions.
        for (int c = 0; c < l.C; c++) {
          double s = 0, ss = 0;
          for (int b = 0; b < B; b++)
            for (int64_t i = 0; i < hw; i++) {
              const double v = cur[size_t(b * n + c * hw + i)];
              s += v, ss += v * v;
            }
          const double cnt = double(B) * hw, mean = s / cnt, var = std::max(0.0, ss / cnt - mean * mean);
          const double sd = std::sqrt(var + 1e-6);
          logs[c] = float(-std::log(sd)), bias[c] = float(-mean / sd);
        }
      }
      double ld = 0;
      for (int c = 0; c < l.C; c++) ld += double(logs[c]) * hw;
      for (int b = 0; b < B; b++) {
        logdet_[size_t(b)] += ld;
        for (int c = 0; c < l.C; c++) {
          const float e = std::exp(logs[c]);
          for (int64_t i = 0; i < hw; i++) y[size_t(b * n + c * hw + i)] = cur[size_t(b * n + c * hw + i)] * e + bias[c];
        }
      }
    } else if (l.kind == Layer::Coupling) {
      const int nA = int(l.A.size()), nT = int(l.T.size());
      l.xa.resize(static_cast<size_t>(B) * nA);
      for (int b = 0; b < B; b++)
        for (int i = 0; i < nA; i++) l.xa[size_t(b * nA + i)] = cur[size_t(b * n + l.A[size_t(i)])];
      mlp_forward(l, B);
      const float* o = l.out.data();
      const int ow = l.dims.back();
      const float* scale = params_.data() + l.scale;
      y = cur;
      for (int b = 0; b < B; b++) {
        double ld = 0;
        for (int j = 0; j < nT; j++) {
          const size_t at = size_t(b * n + l.T[size_t(j)]);
          if (cfg_.additive) {
            y[at] = cur[at] + o[b * ow + j];
          } else {
            const double s = std::exp(double(scale[j])) * std::tanh(double(o[b * ow + j]));
            y[at] = float(cur[at] * std::exp(s) + o[b * ow + nT + j]);
            ld += s;
          }
        }
        logdet_[size_t(b)] += ld;
      }
    } else if (l.kind == Layer::Squeeze) {
      for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) y[size_t(b * n + k)] = cur[size_t(b * n + l.perm[size_t(k)])];
    } else {  // factor out
      const int64_t h = n / 2;
      for (int b = 0; b < B; b++) {
        std::memcpy(z_.data() + b * P + l.zoff, cur.data() + b * n, size_t(h) * 4);
        std::memcpy(y.data() + b * h, cur.data() + b * n + h, size_t(h) * 4);
      }
    }
    cur.swap(y);
  }
  // What is left is the last part of z.
  const int64_t left = int64_t(cur.size()) / B;
  for (int b = 0; b < B; b++) std::memcpy(z_.data() + b * P + (P - left), cur.data() + b * left, size_t(left) * 4);
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
  // d(w·log N(z))/dz = −w·z; the log-det's weight is w itself.
  std::vector<float> dz(z_.size());
  for (int b = 0; b < B; b++)
    for (int64_t i = 0; i < P; i++) dz[size_t(b * P + i)] = float(-wts[b] * z_[size_t(b * P + i)]);
  const int64_t left = layers_.empty() ? P : layers_.back().out_n();
  std::vector<float> dy(size_t(B * left));
  for (int b = 0; b < B; b++) std::memcpy(dy.data() + b * left, dz.data() + b * P + (P - left), size_t(left) * 4);
  for (size_t li = layers_.size(); li-- > 0;) {
    Layer& l = layers_[li];
    const std::vector<float>& x = in_[li];
    const int64_t n = l.n;
    std::vector<float> dx(size_t(B * n));
    if (l.kind == Layer::ActNorm) {
      const int64_t hw = int64_t(l.H) * l.W;
      const float* logs = params_.data() + l.logs;
      float* dlogs = grads_.data() + l.logs;
      float* dbias = grads_.data() + l.bias;
      double wsum = 0;
      for (int b = 0; b < B; b++) wsum += wts[b];
      for (int c = 0; c < l.C; c++) {
        const float e = std::exp(logs[c]);
        double gl = wsum * double(hw), gb = 0;
        for (int b = 0; b < B; b++)
          for (int64_t i = 0; i < hw; i++) {
            const size_t at = size_t(b * n + c * hw + i);
            dx[at] = dy[at] * e;
            gl += double(dy[at]) * x[at] * e, gb += dy[at];
          }
        dlogs[c] += float(gl), dbias[c] += float(gb);
      }
    } else if (l.kind == Layer::Coupling) {
      const int nA = int(l.A.size()), nT = int(l.T.size()), ow = l.dims.back();
      const float* o = l.out.data();
      const float* scale = params_.data() + l.scale;
      float* dscale = grads_.data() + l.scale;
      std::vector<float> dout(static_cast<size_t>(B) * ow);
      dx = dy;  // y_A = x_A passes through; the T entries are overwritten below
      std::vector<double> gscale(static_cast<size_t>(nT), 0.0);
      for (int b = 0; b < B; b++)
        for (int j = 0; j < nT; j++) {
          const size_t at = size_t(b * n + l.T[size_t(j)]);
          if (cfg_.additive) {
            dout[size_t(b * ow + j)] = dy[at];  // dt
            continue;
          }
          const double es = std::exp(double(scale[j])), th = std::tanh(double(o[b * ow + j]));
          const double s = es * th, e = std::exp(s);
          const double ds = double(dy[at]) * x[at] * e + wts[b];
          dx[at] = float(dy[at] * e);
          gscale[size_t(j)] += ds * s;  // ∂s/∂scale = s
          dout[size_t(b * ow + j)] = float(ds * es * (1 - th * th));
          dout[size_t(b * ow + nT + j)] = dy[at];
        }
      if (!cfg_.additive)
        for (int j = 0; j < nT; j++) dscale[j] += float(gscale[size_t(j)]);
      std::vector<float> dh;
      mlp_backward(l, B, dout, dh);
      for (int b = 0; b < B; b++)
        for (int i = 0; i < nA; i++) dx[size_t(b * n + l.A[size_t(i)])] += dh[size_t(b * nA + i)];
    } else if (l.kind == Layer::Squeeze) {
      for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) dx[size_t(b * n + l.perm[size_t(k)])] = dy[size_t(b * n + k)];
    } else {
      const int64_t h = n / 2;
      for (int b = 0; b < B; b++) {
        std::memcpy(dx.data() + b * n, dz.data() + b * P + l.zoff, size_t(h) * 4);
        std::memcpy(dx.data() + b * n + h, dy.data() + b * h, size_t(h) * 4);
      }
    }
    dy.swap(dx);
  }
  if (dx_out) std::memcpy(dx_out, dy.data(), dy.size() * 4);
  if (dev_) {
    // The MLPs' gradients accumulated on the device: into the host's, and the device's start again from zero.
    std::vector<float> g(grads_.size());
    be_.download(g.data(), dev_->grads, g.size() * 4);
    for (size_t i = 0; i < g.size(); i++) grads_[i] += g[i];
    be_.memset(dev_->grads, 0, g.size() * 4);
  }
}

// ---- inverse ----

void RealNVP::inverse(float* x_out, const float* z, int B) {
  KILN_CHECK(B > 0, "realnvp: batch ", B, " must be positive");
  const int64_t P = cfg_.pixels();
  const int64_t left = layers_.empty() ? P : layers_.back().out_n();
  B_ = 0;  // the MLPs' kept activations are the inverse's now: no backward until the next forward
  sync_weights();
  std::vector<float> y(size_t(B * left));
  for (int b = 0; b < B; b++) std::memcpy(y.data() + b * left, z + b * P + (P - left), size_t(left) * 4);
  for (size_t li = layers_.size(); li-- > 0;) {
    Layer& l = layers_[li];
    const int64_t n = l.n;
    std::vector<float> x(size_t(B * n));
    if (l.kind == Layer::ActNorm) {
      const int64_t hw = int64_t(l.H) * l.W;
      const float* logs = params_.data() + l.logs;
      const float* bias = params_.data() + l.bias;
      for (int b = 0; b < B; b++)
        for (int c = 0; c < l.C; c++) {
          const float e = std::exp(-logs[c]);
          for (int64_t i = 0; i < hw; i++) x[size_t(b * n + c * hw + i)] = (y[size_t(b * n + c * hw + i)] - bias[c]) * e;
        }
    } else if (l.kind == Layer::Coupling) {
      // x_A = y_A, so the MLP sees the same input as in the forward.
      const int nA = int(l.A.size()), nT = int(l.T.size()), ow = l.dims.back();
      l.xa.resize(static_cast<size_t>(B) * nA);
      for (int b = 0; b < B; b++)
        for (int i = 0; i < nA; i++) l.xa[size_t(b * nA + i)] = y[size_t(b * n + l.A[size_t(i)])];
      mlp_forward(l, B);
      const std::vector<float>& pre = l.out;
      const float* scale = params_.data() + l.scale;
      x = y;
      for (int b = 0; b < B; b++)
        for (int j = 0; j < nT; j++) {
          const size_t at = size_t(b * n + l.T[size_t(j)]);
          if (cfg_.additive) {
            x[at] = y[at] - pre[size_t(b * ow + j)];
          } else {
            const double s = std::exp(double(scale[j])) * std::tanh(double(pre[size_t(b * ow + j)]));
            x[at] = float((y[at] - pre[size_t(b * ow + nT + j)]) * std::exp(-s));
          }
        }
    } else if (l.kind == Layer::Squeeze) {
      for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < n; k++) x[size_t(b * n + l.perm[size_t(k)])] = y[size_t(b * n + k)];
    } else {
      const int64_t h = n / 2;
      for (int b = 0; b < B; b++) {
        std::memcpy(x.data() + b * n, z + b * P + l.zoff, size_t(h) * 4);
        std::memcpy(x.data() + b * n + h, y.data() + b * h, size_t(h) * 4);
      }
    }
    y.swap(x);
  }
  std::memcpy(x_out, y.data(), y.size() * 4);
}

}  // namespace kiln
