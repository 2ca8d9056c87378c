// The diffusion transformer (models/dit.h): configuration, parameter table, host rearrangements, and the forward
// and backward on the modules.
#include "models/dit.h"

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "models/image_config.h"
#include "nn/act_io.h"

namespace kiln {

// ------------------------------------------------------------------------------------------- configuration

DiTConfig DiTConfig::preset(const std::string& name) {
  DiTConfig c;
  const size_t slash = name.find('/');
  KILN_CHECK(name.rfind("DiT-", 0) == 0 && slash != std::string::npos, "DiT preset '", name,
             "': expected DiT-S/2, DiT-S/4, DiT-B/2 or DiT-B/4");
  const std::string size = name.substr(4, slash - 4), p = name.substr(slash + 1);
  if (size == "S") {
    c.hidden = 384, c.depth = 12, c.heads = 6;
  } else if (size == "B") {
    c.hidden = 768, c.depth = 12, c.heads = 12;
  } else {
    fail("DiT preset '", name, "': size must be S or B");
  }
  KILN_CHECK(p == "2" || p == "4", "DiT preset '", name, "': patch must be 2 or 4");
  c.patch = std::stoi(p);
  return c;
}

void DiTConfig::validate() const {
  auto pos = [](int v, const char* f) { KILN_CHECK(v > 0, "DiT config: ", f, " must be positive, got ", v); };
  pos(image_size, "image_size"), pos(channels, "channels"), pos(patch, "patch"), pos(hidden, "hidden");
  pos(depth, "depth"), pos(heads, "heads"), pos(mlp_ratio, "mlp_ratio"), pos(classes, "classes");
  pos(freq_dim, "freq_dim");
  KILN_CHECK(image_size % patch == 0, "DiT config: patch ", patch, " does not divide image_size ", image_size);
  KILN_CHECK(hidden % heads == 0, "DiT config: heads ", heads, " does not divide hidden ", hidden);
  KILN_CHECK(hidden % 4 == 0, "DiT config: hidden ", hidden, " must be a multiple of 4 (2-D sin-cos positions)");
  KILN_CHECK(freq_dim % 2 == 0, "DiT config: freq_dim ", freq_dim, " must be even");
}

std::string DiTConfig::to_json() const {
  nlohmann::json j = {{"model_type", "dit"}, {"image_size", image_size}, {"channels", channels}, {"patch", patch},
                      {"hidden", hidden},    {"depth", depth},           {"heads", heads},       {"mlp_ratio", mlp_ratio},
                      {"classes", classes},  {"freq_dim", freq_dim}};
  return j.dump(2) + "\n";
}

DiTConfig DiTConfig::from_json(const std::string& text, const std::string& where) {
  const ImageConfigReader r(text, where, "dit");
  DiTConfig c;
  auto get = [&](const char* k, int& v) { r.get(k, v); };
  get("image_size", c.image_size), get("channels", c.channels), get("patch", c.patch), get("hidden", c.hidden);
  get("depth", c.depth), get("heads", c.heads), get("mlp_ratio", c.mlp_ratio), get("classes", c.classes);
  get("freq_dim", c.freq_dim);
  c.validate();
  return c;
}

ParamTable dit_param_table(const DiTConfig& c) {
  c.validate();
  const int64_t D = c.hidden, F = int64_t(c.mlp_ratio) * D;
  ParamTable t;
  auto add = [&](const std::string& n, Shape s, bool packed = false) { t.add(n, n, s, packed); };
  add("x_embedder.proj.weight", {D, c.channels, c.patch, c.patch});
  add("x_embedder.proj.bias", {D});
  add("t_embedder.mlp.0.weight", {D, c.freq_dim});
  add("t_embedder.mlp.0.bias", {D});
  add("t_embedder.mlp.2.weight", {D, D});
  add("t_embedder.mlp.2.bias", {D});
  add("y_embedder.embedding_table.weight", {c.classes + 1, D});
  for (int l = 0; l < c.depth; l++) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    add(b + "attn.qkv.weight", {3 * D, D});
    add(b + "attn.qkv.bias", {3 * D});
    add(b + "attn.proj.weight", {D, D});
    add(b + "attn.proj.bias", {D});
    add(b + "mlp.fc1.weight", {F, D});
    add(b + "mlp.fc1.bias", {F});
    add(b + "mlp.fc2.weight", {D, F});
    add(b + "mlp.fc2.bias", {D});
  }
  add("final_layer.linear.weight", {int64_t(c.patch_dim()), D});
  add("final_layer.linear.bias", {int64_t(c.patch_dim())});
  // The adaLN products back to back: one [(6·depth + 2)·D, D] matrix and one bias vector.
  for (int l = 0; l < c.depth; l++) add("blocks." + std::to_string(l) + ".adaLN_modulation.1.weight", {6 * D, D}, l > 0);
  add("final_layer.adaLN_modulation.1.weight", {2 * D, D}, c.depth > 0);
  for (int l = 0; l < c.depth; l++) add("blocks." + std::to_string(l) + ".adaLN_modulation.1.bias", {6 * D}, l > 0);
  add("final_layer.adaLN_modulation.1.bias", {2 * D}, c.depth > 0);
  return t;
}

// --------------------------------------------------------------------------------------- host rearrangements

void dit_patchify(float* tokens, const float* images, int B, const DiTConfig& c) {
  const int p = c.patch, G = c.grid(), H = c.image_size, C = c.channels, P = c.patch_dim();
  for (int b = 0; b < B; b++)
    for (int gi = 0; gi < G; gi++)
      for (int gj = 0; gj < G; gj++) {
        float* tok = tokens + (int64_t(b) * G * G + gi * G + gj) * P;
        for (int ch = 0; ch < C; ch++)
          for (int i = 0; i < p; i++)
            for (int j = 0; j < p; j++)
              tok[(ch * p + i) * p + j] = images[((int64_t(b) * C + ch) * H + gi * p + i) * H + gj * p + j];
      }
}

// patchify is a permutation, so its adjoint (the input gradient's rearrangement) is its inverse.
void dit_unpatchify_in(float* images, const float* tokens, int B, const DiTConfig& c) {
  const int p = c.patch, G = c.grid(), H = c.image_size, C = c.channels, P = c.patch_dim();
  for (int b = 0; b < B; b++)
    for (int gi = 0; gi < G; gi++)
      for (int gj = 0; gj < G; gj++) {
        const float* tok = tokens + (int64_t(b) * G * G + gi * G + gj) * P;
        for (int ch = 0; ch < C; ch++)
          for (int i = 0; i < p; i++)
            for (int j = 0; j < p; j++)
              images[((int64_t(b) * C + ch) * H + gi * p + i) * H + gj * p + j] = tok[(ch * p + i) * p + j];
      }
}

// The output tokens' features are (i, j, c): the reference's reshape (h, w, p, p, c).
static void out_layout(float* tokens, float* images, int B, const DiTConfig& c, bool to_images) {
  const int p = c.patch, G = c.grid(), H = c.image_size, C = c.channels, P = c.patch_dim();
  for (int b = 0; b < B; b++)
    for (int gi = 0; gi < G; gi++)
      for (int gj = 0; gj < G; gj++) {
        float* tok = tokens + (int64_t(b) * G * G + gi * G + gj) * P;
        for (int i = 0; i < p; i++)
          for (int j = 0; j < p; j++)
            for (int ch = 0; ch < C; ch++) {
              float& im = images[((int64_t(b) * C + ch) * H + gi * p + i) * H + gj * p + j];
              float& tk = tok[(i * p + j) * C + ch];
              if (to_images)
                im = tk;
              else
                tk = im;
            }
      }
}
void dit_unpatchify(float* images, const float* tokens, int B, const DiTConfig& c) {
  out_layout(const_cast<float*>(tokens), images, B, c, true);
}
void dit_patchify_out(float* tokens, const float* images, int B, const DiTConfig& c) {
  out_layout(tokens, const_cast<float*>(images), B, c, false);
}

std::vector<float> dit_pos_embed(const DiTConfig& c) {
  // MAE's 2-D sin-cos: the first half of the channels encodes the column, the second the row; each half is
  // [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k / (D/4)).
  const int D = c.hidden, G = c.grid(), Q = D / 4;
  std::vector<float> pe(size_t(G) * G * D);
  for (int i = 0; i < G; i++)
    for (int j = 0; j < G; j++) {
      float* r = pe.data() + (int64_t(i) * G + j) * D;
      for (int half = 0; half < 2; half++) {
        const double pos = half == 0 ? j : i;
        for (int k = 0; k < Q; k++) {
          const double a = pos / std::pow(10000.0, double(k) / Q);
          r[half * 2 * Q + k] = float(std::sin(a));
          r[half * 2 * Q + Q + k] = float(std::cos(a));
        }
      }
    }
  return pe;
}

void dit_timestep_embedding(float* out, const float* t, int B, int dim) {
  const int half = dim / 2;
  for (int b = 0; b < B; b++)
    for (int k = 0; k < half; k++) {
      const double f = std::exp(-std::log(10000.0) * k / half);
      const double a = double(t[b]) * f;
      out[int64_t(b) * dim + k] = float(std::cos(a));
      out[int64_t(b) * dim + half + k] = float(std::sin(a));
    }
}

// ------------------------------------------------------------------------------------------------ the model

DiT::DiT(const DiTConfig& cfg, nn::Backend& be, bool with_grads)
    : cfg_(cfg), be_(be), table_(dit_param_table(cfg)), with_grads_(with_grads) {
  // The GPU attention kernels take head dims 64 and 128 (DiT-S and DiT-B: 64).
  KILN_CHECK(be.on_host() || cuda_attention_dims(cfg.hidden / cfg.heads, cfg.hidden / cfg.heads), "DiT config: hidden ",
             cfg.hidden, " / heads ", cfg.heads, " = head dim ", cfg.hidden / cfg.heads, ": --device cuda takes 64 or 128");
  params_ = nn::DeviceBlock(be, table_.total * 4, "DiT parameters");
  be.memset(params_.data(), 0, table_.total * 4);
  if (with_grads) {
    grads_ = nn::DeviceBlock(be, table_.total * 4, "DiT gradients");
    be.memset(grads_.data(), 0, table_.total * 4);
  }
  if (be.lowp()) {
    params16_ = nn::DeviceBlock(be, table_.total * 2, "DiT 16-bit weights");
    be.memset(params16_.data(), 0, table_.total * 2);
  }
  bind();
}

void DiT::params_changed() {
  if (be_.lowp()) be_.to_lowp(params16(), params(), int64_t(table_.total), *be_.lowp());
}

DiT::~DiT() = default;

void DiT::bind() {
  const int D = cfg_.hidden, F = cfg_.mlp_ratio * D;
  float* P = params();
  float* G = with_grads_ ? grads() : nullptr;
  uint16_t* P16 = params16();
  auto at = [&](const std::string& n) { return P + table_.get_key(n).offset; };
  auto gat = [&](const std::string& n) { return G ? G + table_.get_key(n).offset : nullptr; };
  auto weight = [&](const std::string& w, const std::string& b, int in, int out) {
    nn::Weight x;
    x.w = at(w), x.b = at(b), x.dw = gat(w), x.db = gat(b), x.in = in, x.out = out, x.layout = nn::Layout::OutIn;
    if (P16) x.w16 = P16 + table_.get_key(w).offset;
    return x;
  };
  x_emb_ = weight("x_embedder.proj.weight", "x_embedder.proj.bias", cfg_.patch_dim(), D);
  t1_ = weight("t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", cfg_.freq_dim, D);
  t2_ = weight("t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", D, D);
  final_ = weight("final_layer.linear.weight", "final_layer.linear.bias", D, cfg_.patch_dim());
  ytable_ = at("y_embedder.embedding_table.weight");
  dytable_ = gat("y_embedder.embedding_table.weight");
  // All adaLN products as one: the first block's tensors start the packed groups.
  const std::string w0 = cfg_.depth > 0 ? "blocks.0.adaLN_modulation.1.weight" : "final_layer.adaLN_modulation.1.weight";
  const std::string b0 = cfg_.depth > 0 ? "blocks.0.adaLN_modulation.1.bias" : "final_layer.adaLN_modulation.1.bias";
  ada_ = weight(w0, b0, D, cfg_.mod_width());
  attn_.assign(size_t(cfg_.depth), {});
  ffn_.assign(size_t(cfg_.depth), {});
  for (int l = 0; l < cfg_.depth; l++) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    nn::Attention& a = attn_[size_t(l)];
    a.shape.C = D, a.shape.NH = cfg_.heads, a.shape.NKV = cfg_.heads, a.shape.HD = D / cfg_.heads;
    a.qkv = weight(b + "attn.qkv.weight", b + "attn.qkv.bias", D, 3 * D);
    a.proj = weight(b + "attn.proj.weight", b + "attn.proj.bias", D, D);
    nn::FeedForward& f = ffn_[size_t(l)];
    f.shape.C = D, f.shape.F = F, f.shape.gated = false, f.shape.act = Activation::GeluTanh;
    f.up = weight(b + "mlp.fc1.weight", b + "mlp.fc1.bias", D, F);
    f.down = weight(b + "mlp.fc2.weight", b + "mlp.fc2.bias", F, D);
  }
}

void DiT::init_random(uint64_t seed) {
  std::vector<float> h(table_.total, 0.0f);
  for (size_t i = 0; i < table_.specs.size(); i++) {
    const ParamSpec& s = table_.specs[i];
    if (s.shape.ndim == 1 || s.key.find("adaLN_modulation") != std::string::npos ||
        s.key.rfind("final_layer.linear", 0) == 0)
      continue;  // biases, adaLN products and the output layer start at zero
    Rng r(seed * 0x9E3779B97F4A7C15ull + i);
    float* w = h.data() + s.offset;
    if (s.key.rfind("t_embedder", 0) == 0 || s.key.rfind("y_embedder", 0) == 0) {
      for (int64_t j = 0; j < s.numel(); j++) w[j] = 0.02f * r.normal();
    } else {
      const int64_t out = s.shape.dims[0], in = s.numel() / out;  // Xavier over the weight as a matrix
      const float bound = float(std::sqrt(6.0 / double(in + out)));
      for (int64_t j = 0; j < s.numel(); j++) w[j] = (2.0f * r.uniform() - 1.0f) * bound;
    }
  }
  be_.upload(params(), h.data(), h.size() * 4);
  params_changed();
}

void DiT::zero_grad() {
  if (with_grads_) be_.memset(grads(), 0, table_.total * 4);
}

void DiT::carve(nn::Workspace& ws, int B) {
  const int64_t D = cfg_.hidden, T = cfg_.tokens(), N = int64_t(B) * T, M = cfg_.mod_width();
  patches_ = ws.act(N * cfg_.patch_dim());
  pos_ = ws.f32(N * D);
  zeros_ = ws.f32(N * D);
  ones_ = ws.f32(D), zerosD_ = ws.f32(D), dummy_ = ws.f32(2 * D);
  tfreq_ = ws.act(int64_t(B) * cfg_.freq_dim);
  t1a_ = ws.act(B * D), t1s_ = ws.act(B * D), cact_ = ws.act(B * D), sc_ = ws.act(B * D);
  yemb_ = ws.f32(B * D), c_ = ws.f32(B * D);
  mod_ = ws.act(B * M);
  labels_ = ws.i32(B), zpos_ = ws.i32(B);
  xs_.assign(size_t(cfg_.depth + 1), nullptr);
  for (auto& x : xs_) x = ws.f32(N * D);
  // With block recomputation one set of block activations serves every block (the backward reruns each block's
  // forward into it from the kept residual stream xs_[l]); so does a model without gradients (sampling), which
  // never reads them again: 1/depth of the memory, and the set stays warmer in the caches.
  acts_.assign(size_t(shared_acts() ? std::min(1, cfg_.depth) : cfg_.depth), {});
  for (int l = 0; l < int(acts_.size()); l++) {
    BlockActs& a = acts_[size_t(l)];
    a.ln1 = ws.act(N * D), a.m1 = ws.act(N * D), a.ln2 = ws.act(N * D), a.m2 = ws.act(N * D);
    a.mean1 = ws.f32(N), a.rstd1 = ws.f32(N), a.mean2 = ws.f32(N), a.rstd2 = ws.f32(N);
    a.u1 = ws.f32(N * D), a.h = ws.f32(N * D), a.u2 = ws.f32(N * D);
    a.attn.allocate(ws, N, attn_[size_t(l)].shape);
    a.ffn.allocate(ws, N, ffn_[size_t(l)].shape);
  }
  // The output in fp32 on every backend (a product may write fp32 rows): the host reads it without rounding.
  lnf_ = ws.act(N * D), mf_ = ws.act(N * D), out_ = nn::Act{ws.f32(N * cfg_.patch_dim()), DType::F32};
  meanf_ = ws.f32(N), rstdf_ = ws.f32(N);
  if (with_grads_) {
    dres_ = ws.f32(N * D);
    dop_ = ws.act(N * D), du_ = ws.act(N * D), dm_ = ws.act(N * D), dln_ = ws.act(N * D);
    dmod_ = ws.act(B * M), dsc_ = ws.act(B * D), dc_ = ws.act(B * D), dt1s_ = ws.act(B * D), dt1_ = ws.act(B * D);
    dcf_ = ws.f32(B * D);
    dout_ = ws.act(N * cfg_.patch_dim()), dpatches_ = ws.act(N * cfg_.patch_dim());
    if (cfg_.depth > 0) {
      as_.allocate(ws, N, attn_[0].shape);
      fs_.allocate(ws, N, ffn_[0].shape);
    }
  }
}

size_t DiT::plan(int B, bool recompute_blocks) {
  KILN_CHECK(B > 0, "DiT plan: batch ", B, " must be positive");
  recompute_ = recompute_blocks;
  nn::Workspace measure(be_.act_dtype());
  carve(measure, B);
  ws_ = nn::Workspace(be_, measure.peak(), "DiT activations");
  carve(ws_, B);
  planned_ = B;
  const int64_t D = cfg_.hidden, T = cfg_.tokens();
  // Constants: the positions tiled over the batch, zeros (the branches' residual), LayerNorm without affine.
  const std::vector<float> pe = dit_pos_embed(cfg_);
  std::vector<float> tiled(size_t(B) * T * D);
  for (int b = 0; b < B; b++) std::memcpy(tiled.data() + b * T * D, pe.data(), pe.size() * 4);
  be_.upload(pos_, tiled.data(), tiled.size() * 4);
  be_.memset(zeros_, 0, size_t(B) * T * D * 4);
  std::vector<float> ones(size_t(D), 1.0f);
  be_.upload(ones_, ones.data(), ones.size() * 4);
  be_.memset(zerosD_, 0, size_t(D) * 4);
  be_.memset(zpos_, 0, size_t(B) * 4);
  // The device scratch of the norm, embedding and attention backwards (nothing on the CPU).
  nn::OpScratch ops;
  ops.rows = int64_t(B) * T, ops.C = int(D);
  ops.decode.B = 0;  // no KV-cache decoding
  if (with_grads_ && cfg_.depth > 0) ops.attention = attention(B);
  be_.reserve_scratch(ops);
  return ws_.capacity();
}

AttentionParams DiT::attention(int B) const {
  AttentionParams ap;
  const int D = cfg_.hidden;
  ap.B = B, ap.T = cfg_.tokens(), ap.NH = cfg_.heads, ap.NKV = cfg_.heads, ap.HD = D / cfg_.heads, ap.causal = false;
  ap.scale = 1.0f / std::sqrt(float(ap.HD));
  return ap;
}

// Block l from xs_[l] into xs_[l + 1], keeping its activations (in the shared set when recomputing).
void DiT::block_forward(int l) {
  const int B = B_, D = cfg_.hidden, T = cfg_.tokens();
  const int64_t N = int64_t(B) * T, M = cfg_.mod_width();
  const float eps = 1e-6f;
  const AttentionParams ap = attention(B);
  BlockActs& a = acts_[shared_acts() ? 0 : size_t(l)];
  const nn::Act m = mod_.at(int64_t(l) * 6 * D);  // shift1 scale1 gate1 shift2 scale2 gate2, row stride M
  const float* xin = xs_[size_t(l)];
  be_.layernorm_forward(a.ln1, a.mean1, a.rstd1, xin, ones_, zerosD_, N, D, eps);
  be_.modulate_forward(a.m1, a.ln1, m, m.at(D), B, T, D, M);
  attn_[size_t(l)].forward(be_, a.u1, zeros_, a.m1, a.attn, nullptr, ap, N);
  be_.gate_forward(a.h, xin, a.u1, m.at(2 * D), B, T, D, M);
  be_.layernorm_forward(a.ln2, a.mean2, a.rstd2, a.h, ones_, zerosD_, N, D, eps);
  be_.modulate_forward(a.m2, a.ln2, m.at(3 * D), m.at(4 * D), B, T, D, M);
  ffn_[size_t(l)].forward(be_, a.u2, zeros_, a.m2, a.ffn, fs_, N);
  be_.gate_forward(xs_[size_t(l) + 1], a.h, a.u2, m.at(5 * D), B, T, D, M);
}

void DiT::forward(float* out, const float* x, const float* c_noise, const int32_t* labels, int B) {
  KILN_CHECK(B > 0 && B <= planned_, "DiT forward: batch ", B, " exceeds the planned ", planned_);
  for (int b = 0; b < B; b++)
    KILN_CHECK(labels[b] >= 0 && labels[b] <= cfg_.classes, "DiT forward: label ", labels[b], " of sample ", b,
               " is out of range [0, ", cfg_.classes, "] (", cfg_.classes, ": no class)");
  B_ = B;
  const int D = cfg_.hidden, T = cfg_.tokens();
  const int64_t N = int64_t(B) * T, M = cfg_.mod_width();
  const float eps = 1e-6f;
  // Inputs: patches, the noise level's frequencies, labels.
  host_tokens_.resize(size_t(N) * cfg_.patch_dim());
  dit_patchify(host_tokens_.data(), x, B, cfg_);
  nn::upload_act(be_, patches_, host_tokens_.data(), int64_t(host_tokens_.size()));
  std::vector<float> freq(size_t(B) * cfg_.freq_dim);
  dit_timestep_embedding(freq.data(), c_noise, B, cfg_.freq_dim);
  nn::upload_act(be_, tfreq_, freq.data(), int64_t(freq.size()));
  be_.upload(labels_, labels, size_t(B) * 4);

  be_.linear_residual(xs_[0], pos_, patches_, x_emb_, N);
  // Conditioning: c = MLP(freq) + table[y]; every adaLN vector in one product of SiLU(c).
  be_.linear_forward(t1a_, tfreq_, t1_, B);
  be_.activation_forward(t1s_, t1a_, int64_t(B) * D, Activation::Silu);
  be_.embedding_forward(yemb_, labels_, zpos_, ytable_, nullptr, B, D);
  be_.linear_residual(c_, yemb_, t1s_, t2_, B);
  cact_ = be_.residual_operand(c_, cact_, int64_t(B) * D);
  be_.activation_forward(sc_, cact_, int64_t(B) * D, Activation::Silu);
  be_.linear_forward(mod_, sc_, ada_, B);

  for (int l = 0; l < cfg_.depth; l++) block_forward(l);
  const nn::Act mf = mod_.at(int64_t(cfg_.depth) * 6 * D);  // final shift, scale
  be_.layernorm_forward(lnf_, meanf_, rstdf_, xs_.back(), ones_, zerosD_, N, D, eps);
  be_.modulate_forward(mf_, lnf_, mf, mf.at(D), B, T, D, M);
  be_.linear_forward(out_, mf_, final_, N);
  be_.download(host_tokens_.data(), out_.p, host_tokens_.size() * 4);
  dit_unpatchify(out, host_tokens_.data(), B, cfg_);
}

void DiT::backward(const float* dout, float* dx) {
  KILN_CHECK(with_grads_, "DiT backward: the model was made without gradients");
  KILN_CHECK(B_ > 0, "DiT backward: no forward to differentiate");
  const int B = B_, D = cfg_.hidden, T = cfg_.tokens();
  const int64_t N = int64_t(B) * T, M = cfg_.mod_width();
  dit_patchify_out(host_tokens_.data(), dout, B, cfg_);
  nn::upload_act(be_, dout_, host_tokens_.data(), int64_t(host_tokens_.size()));
  AttentionParams ap;
  ap.B = B, ap.T = T, ap.NH = cfg_.heads, ap.NKV = cfg_.heads, ap.HD = D / cfg_.heads, ap.causal = false;
  ap.scale = 1.0f / std::sqrt(float(ap.HD));

  // Final layer. Every slice of dmod is overwritten by its modulate/gate backward.
  const nn::Act mf = mod_.at(int64_t(cfg_.depth) * 6 * D), dmf = dmod_.at(int64_t(cfg_.depth) * 6 * D);
  be_.linear_backward(dm_, dout_, mf_, final_, N);
  be_.modulate_backward(dln_, dmf, dmf.at(D), dm_, lnf_, mf.at(D), B, T, D, M);
  be_.memset(dres_, 0, size_t(N) * D * 4);
  be_.layernorm_backward(dres_, dummy_, dummy_ + D, dln_, xs_.back(), ones_, meanf_, rstdf_, N, D);

  for (int l = cfg_.depth - 1; l >= 0; l--) {
    if (recompute_) block_forward(l);  // the same kernels on the same input: identical activations
    const BlockActs& a = acts_[recompute_ ? 0 : size_t(l)];
    const nn::Act m = mod_.at(int64_t(l) * 6 * D), dm = dmod_.at(int64_t(l) * 6 * D);
    // y = h + gate2·u2: dres is dL/dy and passes through to dL/dh.
    be_.gate_backward(du_, dm.at(5 * D), dres_, a.u2, m.at(5 * D), B, T, D, M);
    ffn_[size_t(l)].backward(be_, dm_, du_, a.m2, a.ffn, fs_, N);
    be_.modulate_backward(dln_, dm.at(3 * D), dm.at(4 * D), dm_, a.ln2, m.at(4 * D), B, T, D, M);
    be_.layernorm_backward(dres_, dummy_, dummy_ + D, dln_, a.h, ones_, a.mean2, a.rstd2, N, D);
    // h = x + gate1·u1.
    be_.gate_backward(du_, dm.at(2 * D), dres_, a.u1, m.at(2 * D), B, T, D, M);
    attn_[size_t(l)].backward(be_, dm_, du_, a.m1, a.attn, as_, nullptr, ap, N);
    be_.modulate_backward(dln_, dm, dm.at(D), dm_, a.ln1, m.at(D), B, T, D, M);
    be_.layernorm_backward(dres_, dummy_, dummy_ + D, dln_, xs_[size_t(l)], ones_, a.mean1, a.rstd1, N, D);
  }
  // The patch embedding; with dx, its input gradient too (the positions and the conditioning do not depend on x).
  be_.linear_backward(dx ? dpatches_ : nn::Act{}, be_.residual_operand(dres_, dop_, N * D), patches_, x_emb_, N);
  if (dx) {
    nn::download_act(be_, host_tokens_.data(), dpatches_, N * cfg_.patch_dim());
    dit_unpatchify_in(dx, host_tokens_.data(), B, cfg_);
  }

  // Conditioning: back through the one adaLN product, SiLU, the noise MLP and the class table.
  be_.linear_backward(dsc_, dmod_, sc_, ada_, B);
  be_.activation_backward(dc_, cact_, dsc_, int64_t(B) * D, Activation::Silu);
  be_.linear_backward(dt1s_, dc_, t1s_, t2_, B);
  be_.embedding_backward(dytable_, nullptr, nn::act_as_f32(be_, dcf_, dc_, int64_t(B) * D), labels_, zpos_, B, D);
  be_.activation_backward(dt1_, t1a_, dt1s_, int64_t(B) * D, Activation::Silu);
  be_.linear_backward(nn::Act{}, dt1_, tfreq_, t1_, B);
}

}  // namespace kiln
