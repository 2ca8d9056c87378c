// The ViT classifier (models/vit.h).
#include "models/vit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "models/image_config.h"
#include "nn/act_io.h"

namespace kiln {

DiTConfig ViTConfig::layout() const {
  DiTConfig d;
  d.image_size = image_size, d.channels = channels, d.patch = patch, d.hidden = hidden, d.depth = depth;
  d.heads = heads, d.classes = classes;
  return d;
}

void ViTConfig::validate() const { layout().validate(); }

std::string ViTConfig::to_json() const {
  nlohmann::json j = {{"model_type", "vit"}, {"image_size", image_size}, {"channels", channels}, {"patch", patch},
                      {"hidden", hidden},    {"depth", depth},           {"heads", heads},       {"mlp_ratio", mlp_ratio},
                      {"classes", classes}};
  return j.dump(2) + "\n";
}

ViTConfig ViTConfig::from_json(const std::string& text, const std::string& where) {
  const ImageConfigReader r(text, where, "vit");
  ViTConfig c;
  auto get = [&](const char* k, int& v) { r.get(k, v); };
  get("image_size", c.image_size), get("channels", c.channels), get("patch", c.patch), get("hidden", c.hidden);
  get("depth", c.depth), get("heads", c.heads), get("mlp_ratio", c.mlp_ratio), get("classes", c.classes);
  c.validate();
  return c;
}

ParamTable vit_param_table(const ViTConfig& c) {
  c.validate();
  const int64_t D = c.hidden, F = int64_t(c.mlp_ratio) * D;
  ParamTable t;
  auto add = [&](const std::string& n, Shape s) { t.add(n, n, s); };
  add("patch_embed.weight", {D, c.channels, c.patch, c.patch});
  add("patch_embed.bias", {D});
  for (int l = 0; l < c.depth; l++) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    add(b + "norm1.weight", {D}), add(b + "norm1.bias", {D});
    add(b + "attn.qkv.weight", {3 * D, D}), add(b + "attn.qkv.bias", {3 * D});
    add(b + "attn.proj.weight", {D, D}), add(b + "attn.proj.bias", {D});
    add(b + "norm2.weight", {D}), add(b + "norm2.bias", {D});
    add(b + "mlp.fc1.weight", {F, D}), add(b + "mlp.fc1.bias", {F});
    add(b + "mlp.fc2.weight", {D, F}), add(b + "mlp.fc2.bias", {D});
  }
  add("norm.weight", {D}), add("norm.bias", {D});
  add("head.weight", {int64_t(c.classes), D}), add("head.bias", {int64_t(c.classes)});
  return t;
}

ViT::ViT(const ViTConfig& cfg, nn::Backend& be, bool with_grads)
    : cfg_(cfg), be_(be), table_(vit_param_table(cfg)), with_grads_(with_grads) {
  // The GPU attention kernels take head dims 64 and 128 (the default ViT's 24 runs on the CPU only).
  KILN_CHECK(be.on_host() || cuda_attention_dims(cfg.hidden / cfg.heads, cfg.hidden / cfg.heads), "ViT config: hidden ",
             cfg.hidden, " / heads ", cfg.heads, " = head dim ", cfg.hidden / cfg.heads, ": --device cuda takes 64 or 128");
  params_ = nn::DeviceBlock(be, table_.total * 4, "ViT parameters");
  be.memset(params_.data(), 0, table_.total * 4);
  if (with_grads) {
    grads_ = nn::DeviceBlock(be, table_.total * 4, "ViT gradients");
    be.memset(grads_.data(), 0, table_.total * 4);
  }
  if (be.lowp()) {
    params16_ = nn::DeviceBlock(be, table_.total * 2, "ViT 16-bit weights");
    be.memset(params16_.data(), 0, table_.total * 2);
  }
  const int D = cfg.hidden, F = cfg.mlp_ratio * D;
  uint16_t* P16 = params16();
  float* P = params();
  float* G = with_grads ? grads() : nullptr;
  auto at = [&](const std::string& n) { return P + table_.get_key(n).offset; };
  auto gat = [&](const std::string& n) { return G ? G + table_.get_key(n).offset : nullptr; };
  auto weight = [&](const std::string& p, int in, int out) {
    nn::Weight w;
    w.w = at(p + ".weight"), w.b = at(p + ".bias"), w.dw = gat(p + ".weight"), w.db = gat(p + ".bias");
    w.in = in, w.out = out, w.layout = nn::Layout::OutIn;
    if (P16) w.w16 = P16 + table_.get_key(p + ".weight").offset;
    return w;
  };
  auto norm = [&](const std::string& p) {
    nn::Norm n;
    n.type = nn::NormType::LayerNorm, n.w = at(p + ".weight"), n.b = at(p + ".bias");
    n.dw = gat(p + ".weight"), n.db = gat(p + ".bias"), n.dim = D, n.eps = 1e-6f;
    return n;
  };
  patch_ = weight("patch_embed", cfg.layout().patch_dim(), D);
  head_ = weight("head", D, cfg.classes);
  norm_ = norm("norm");
  blocks_.resize(size_t(cfg.depth));
  for (int l = 0; l < cfg.depth; l++) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    nn::Block& k = blocks_[size_t(l)];
    k.shape.attn.C = D, k.shape.attn.NH = cfg.heads, k.shape.attn.NKV = cfg.heads, k.shape.attn.HD = D / cfg.heads;
    k.shape.ffn.C = D, k.shape.ffn.F = F, k.shape.ffn.gated = false, k.shape.ffn.act = Activation::GeluTanh;
    k.norm1 = norm(b + "norm1"), k.norm2 = norm(b + "norm2");
    k.attn.shape = k.shape.attn, k.ffn.shape = k.shape.ffn;
    k.attn.qkv = weight(b + "attn.qkv", D, 3 * D), k.attn.proj = weight(b + "attn.proj", D, D);
    k.ffn.up = weight(b + "mlp.fc1", D, F), k.ffn.down = weight(b + "mlp.fc2", F, D);
  }
}

ViT::~ViT() = default;

void ViT::init_random(uint64_t seed) {
  std::vector<float> h(table_.total, 0.0f);
  for (size_t i = 0; i < table_.specs.size(); i++) {
    const ParamSpec& s = table_.specs[i];
    float* w = h.data() + s.offset;
    if (s.shape.ndim == 1) {
      const bool gain = s.key.find("norm") != std::string::npos && s.key.find(".weight") != std::string::npos;
      for (int64_t j = 0; j < s.numel(); j++) w[j] = gain ? 1.0f : 0.0f;
      continue;
    }
    Rng r(seed * 0x9E3779B97F4A7C15ull + i);
    const int64_t out = s.shape.dims[0], in = s.numel() / out;
    const float bound = float(std::sqrt(6.0 / double(in + out)));
    for (int64_t j = 0; j < s.numel(); j++) w[j] = (2.0f * r.uniform() - 1.0f) * bound;
  }
  be_.upload(params(), h.data(), h.size() * 4);
  params_changed();
}

void ViT::params_changed() {
  if (be_.lowp()) be_.to_lowp(params16(), params(), int64_t(table_.total), *be_.lowp());
}

void ViT::zero_grad() {
  if (with_grads_) be_.memset(grads(), 0, table_.total * 4);
}

void ViT::carve(nn::Workspace& ws, int B) {
  const int64_t D = cfg_.hidden, T = cfg_.layout().tokens(), N = int64_t(B) * T;
  patches_ = ws.act(N * cfg_.layout().patch_dim());
  pos_ = ws.f32(N * D);
  xs_.assign(size_t(cfg_.depth + 1), nullptr);
  for (auto& x : xs_) x = ws.f32(N * D);
  acts_.assign(size_t(cfg_.depth), {});
  for (int l = 0; l < cfg_.depth; l++) acts_[size_t(l)].allocate(ws, N, blocks_[size_t(l)].shape);
  lnf_ = ws.act(N * D), meanf_ = ws.f32(N), rstdf_ = ws.f32(N);
  pooled_ = ws.act(B * D), logits_ = ws.act(int64_t(B) * cfg_.classes);
  losses_ = ws.f32(B), targets_ = ws.i32(B);
  if (with_grads_) {
    dpooled_ = ws.act(B * D), dlnf_ = ws.act(N * D), dres_ = ws.f32(N * D), dop_ = ws.act(N * D);
    if (cfg_.depth > 0) scratch_.allocate(ws, N, blocks_[0].shape);
  }
}

size_t ViT::plan(int B) {
  KILN_CHECK(B > 0, "ViT plan: batch ", B, " must be positive");
  nn::Workspace measure(be_.act_dtype());
  carve(measure, B);
  ws_ = nn::Workspace(be_, measure.peak(), "ViT activations");
  carve(ws_, B);
  planned_ = B;
  const int64_t D = cfg_.hidden, T = cfg_.layout().tokens();
  const std::vector<float> pe = dit_pos_embed(cfg_.layout());
  std::vector<float> tiled(size_t(B) * T * D);
  for (int b = 0; b < B; b++) std::memcpy(tiled.data() + b * T * D, pe.data(), pe.size() * 4);
  be_.upload(pos_, tiled.data(), tiled.size() * 4);
  // The device scratch of the norm and attention backwards (nothing on the CPU).
  nn::OpScratch ops;
  ops.rows = int64_t(B) * T, ops.C = int(D);
  ops.decode.B = 0;  // no KV-cache decoding
  if (with_grads_ && cfg_.depth > 0) {
    ops.attention.B = B, ops.attention.T = int(T), ops.attention.NH = cfg_.heads, ops.attention.NKV = cfg_.heads;
    ops.attention.HD = int(D) / cfg_.heads, ops.attention.causal = false;
  }
  be_.reserve_scratch(ops);
  return ws_.capacity();
}

double ViT::forward(float* logits, float* features, const float* images, const int32_t* labels, int B) {
  KILN_CHECK(B > 0 && B <= planned_, "ViT forward: batch ", B, " exceeds the planned ", planned_);
  B_ = B;
  const int D = cfg_.hidden, T = cfg_.layout().tokens(), K = cfg_.classes;
  const int64_t N = int64_t(B) * T;
  host_.resize(size_t(N) * cfg_.layout().patch_dim());
  dit_patchify(host_.data(), images, B, cfg_.layout());
  nn::upload_act(be_, patches_, host_.data(), int64_t(host_.size()));
  be_.linear_residual(xs_[0], pos_, patches_, patch_, N);
  AttentionParams ap;
  ap.B = B, ap.T = T, ap.NH = cfg_.heads, ap.NKV = cfg_.heads, ap.HD = D / cfg_.heads, ap.causal = false;
  ap.scale = 1.0f / std::sqrt(float(ap.HD));
  for (int l = 0; l < cfg_.depth; l++)
    blocks_[size_t(l)].forward(be_, xs_[size_t(l) + 1], xs_[size_t(l)], acts_[size_t(l)], scratch_, nullptr, ap, N);
  norm_.forward(be_, lnf_, meanf_, rstdf_, xs_.back(), N);
  // Mean over each image's tokens (on the host: B·T·D values).
  std::vector<float> ln(size_t(N) * D), pooled(size_t(B) * D, 0.0f);
  nn::download_act(be_, ln.data(), lnf_, int64_t(ln.size()));
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < D; c++) pooled[size_t(b) * D + c] += ln[(size_t(b) * T + t) * D + c] / float(T);
  nn::upload_act(be_, pooled_, pooled.data(), int64_t(pooled.size()));
  if (features) std::memcpy(features, pooled.data(), pooled.size() * 4);
  be_.linear_forward(logits_, pooled_, head_, B);
  nn::download_act(be_, logits, logits_, int64_t(B) * K);
  if (!labels) return 0;
  for (int b = 0; b < B; b++)
    KILN_CHECK(labels[b] >= 0 && labels[b] < K, "ViT: label ", labels[b], " of image ", b, " out of range");
  if (smoothing_ > 0) {
    // Smoothed targets on the host (B·K values): loss −Σ_k t_k·log p_k, its gradient (p − t)/B into logits_.
    std::vector<float> g(size_t(B) * K);
    double s = 0;
    for (int b = 0; b < B; b++) {
      const float* l = logits + int64_t(b) * K;
      const float mx = *std::max_element(l, l + K);
      double z = 0;
      for (int k = 0; k < K; k++) z += std::exp(double(l[k] - mx));
      const double lz = std::log(z) + mx;
      for (int k = 0; k < K; k++) {
        const double t = (k == labels[b] ? 1.0 - smoothing_ : 0.0) + smoothing_ / K;
        s -= t * (double(l[k]) - lz);
        g[size_t(b) * K + k] = float((std::exp(double(l[k]) - lz) - t) / B);
      }
    }
    if (with_grads_) nn::upload_act(be_, logits_, g.data(), int64_t(g.size()));
    return s / B;
  }
  be_.upload(targets_, labels, size_t(B) * 4);
  // The logits become their gradient of the mean loss.
  be_.softmax_crossentropy(logits_, losses_, targets_, B, K, K, with_grads_ ? 1.0f / float(B) : 0.0f);
  std::vector<float> l(static_cast<size_t>(B));
  be_.download(l.data(), losses_, l.size() * 4);
  double s = 0;
  for (float v : l) s += v;
  return s / B;
}

void ViT::backward() {
  KILN_CHECK(with_grads_ && B_ > 0, "ViT backward: no training forward to differentiate");
  const int B = B_, D = cfg_.hidden, T = cfg_.layout().tokens();
  const int64_t N = int64_t(B) * T;
  be_.linear_backward(dpooled_, logits_, pooled_, head_, B);
  std::vector<float> dp(size_t(B) * D), dl(size_t(N) * D);
  nn::download_act(be_, dp.data(), dpooled_, int64_t(dp.size()));
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < D; c++) dl[(size_t(b) * T + t) * D + c] = dp[size_t(b) * D + c] / float(T);
  nn::upload_act(be_, dlnf_, dl.data(), int64_t(dl.size()));
  be_.memset(dres_, 0, size_t(N) * D * 4);
  norm_.backward(be_, dres_, dlnf_, xs_.back(), meanf_, rstdf_, N);
  AttentionParams ap;
  ap.B = B, ap.T = T, ap.NH = cfg_.heads, ap.NKV = cfg_.heads, ap.HD = D / cfg_.heads, ap.causal = false;
  ap.scale = 1.0f / std::sqrt(float(ap.HD));
  for (int l = cfg_.depth - 1; l >= 0; l--)
    blocks_[size_t(l)].backward(be_, dres_, xs_[size_t(l)], acts_[size_t(l)], scratch_, nullptr, ap, N);
  be_.linear_backward(nn::Act{}, be_.residual_operand(dres_, dop_, N * D), patches_, patch_, N);
}

}  // namespace kiln
