#include "models/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"
#include "kernels/argmax.h"
#include "models/family.h"

namespace kiln {

namespace {

bool ends_with(const std::string& s, const char* suffix) {
  const size_t k = std::strlen(suffix);
  return s.size() >= k && s.compare(s.size() - k, k, suffix) == 0;
}

nn::Layout layout_of(const ModelConfig& c) {
  return c.layout == WeightLayout::InOut ? nn::Layout::InOut : nn::Layout::OutIn;
}

}  // namespace

// ---- binding by name ----

void TransformerWeights::bind(const ModelConfig& c, const ParamTable& t, const float* params, float* grads,
                              const uint16_t* params16, const float* inv_freq) {
  auto p = [&](const std::string& key) -> const float* {
    const ParamSpec* s = t.find_key(key);
    return s ? params + s->offset : nullptr;
  };
  auto g = [&](const std::string& key) -> float* {
    const ParamSpec* s = t.find_key(key);
    return s && grads ? grads + s->offset : nullptr;
  };
  auto p16 = [&](const std::string& key) -> const uint16_t* {
    const ParamSpec* s = t.find_key(key);
    return s && params16 ? params16 + s->offset : nullptr;
  };
  auto weight = [&](const std::string& w, const std::string& b, int in, int out) {
    nn::Weight x;
    x.w = &params[t.get_key(w).offset];
    x.dw = g(w);
    x.w16 = p16(w);
    x.b = b.empty() ? nullptr : p(b);
    x.db = b.empty() ? nullptr : g(b);
    x.in = in;
    x.out = out;
    x.layout = layout_of(c);
    return x;
  };
  const nn::NormType nt = c.norm == NormKind::LayerNorm ? nn::NormType::LayerNorm : nn::NormType::RMSNorm;
  auto norm = [&](const std::string& k) {
    return nn::Norm{nt, p(k + ".weight"), p(k + ".bias"), g(k + ".weight"), g(k + ".bias"), c.d_model, c.norm_eps};
  };
  nn::BlockShape S;
  S.C = c.d_model;
  S.NH = c.n_head;
  S.NKV = c.n_kv_head;
  S.HD = c.head_dim;
  S.F = c.d_ff;
  S.gated = c.gated_ffn;
  S.act = c.activation;
  S.qk_norm = c.qk_norm;
  S.qk_eps = c.norm_eps;
  S.rotary = c.positions == PositionKind::Rotary;
  S.rot_dim = c.head_dim;

  blocks.assign(size_t(c.n_layer), nn::Block{});
  for (int l = 0; l < c.n_layer; l++) {
    const std::string b = "blk." + std::to_string(l) + ".";
    nn::Block& k = blocks[size_t(l)];
    k.shape = S;
    k.norm1 = norm(b + "attn_norm");
    k.norm2 = norm(b + "ffn_norm");
    // q, k, v are one matrix: GPT-2's fused c_attn, or the packed q/k/v projections.
    const std::string qkv = c.layout == WeightLayout::InOut ? "attn_qkv" : "attn_q";
    k.qkv = weight(b + qkv + ".weight", c.qkv_bias ? b + qkv + ".bias" : "", c.d_model, c.qkv_dim());
    k.proj = weight(b + "attn_output.weight", c.attn_out_bias ? b + "attn_output.bias" : "", c.q_dim(), c.d_model);
    const std::string up = c.gated_ffn ? "ffn_gate" : "ffn_up";  // gate and up packed: [gate | up] rows
    k.up = weight(b + up + ".weight", c.ffn_bias ? b + up + ".bias" : "", c.d_model, S.up());
    k.down = weight(b + "ffn_down.weight", c.ffn_bias ? b + "ffn_down.bias" : "", c.d_ff, c.d_model);
    if (c.qk_norm) {
      k.q_norm = p(b + "attn_q_norm.weight");
      k.k_norm = p(b + "attn_k_norm.weight");
      k.dq_norm = g(b + "attn_q_norm.weight");
      k.dk_norm = g(b + "attn_k_norm.weight");
    }
    k.rope = RopeParams{S.NH + S.NKV, S.HD, S.rot_dim, S.qkv(), inv_freq};
  }
  final_norm = norm("output_norm");
  wte = p("token_embd.weight");
  wpe = p("position_embd.weight");
  dwte = g("token_embd.weight");
  dwpe = g("position_embd.weight");
  const std::string head_key = c.tie_embeddings ? "token_embd.weight" : "output.weight";
  head = weight(head_key, "", c.d_model, c.vocab_size);
  head.layout = nn::Layout::OutIn;  // [V, C] in every family
}

// ---- shared by training and decoding ----

AttentionParams Model::attention(int B, int T) const {
  const ModelConfig& c = config();
  AttentionParams ap;
  ap.B = B;
  ap.T = T;
  ap.NH = c.n_head;
  ap.NKV = c.n_kv_head;
  ap.HD = c.head_dim;
  ap.window = c.sliding_window;
  ap.causal = true;
  ap.scale = c.attention_scale();
  return ap;
}

void Model::init_random(uint64_t seed) {
  const ModelConfig& c = config();
  const ParamTable& t = table();
  float* params = host_params();
  const float std_resid = 0.02f / std::sqrt(2.0f * float(c.n_layer));
  for (size_t i = 0; i < t.specs.size(); i++) {
    const ParamSpec& s = t.specs[i];
    float* w = params + s.offset;
    if (s.shape.ndim == 1) {
      const float v = ends_with(s.key, "norm.weight") ? 1.0f : 0.0f;  // norm gains 1, biases 0
      for (int64_t j = 0; j < s.numel(); j++) w[j] = v;
      continue;
    }
    const float std = (ends_with(s.key, "attn_output.weight") || ends_with(s.key, "ffn_down.weight")) ? std_resid : 0.02f;
    // One Philox stream per tensor, chunked so threads fill disjoint ranges deterministically.
    const int64_t n_el = s.numel(), chunk = 1 << 16;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n_el; c0 += chunk) {
      Rng r(seed * 0x9E3779B97F4A7C15ull + i, uint64_t(c0) * 2);
      const int64_t c1 = std::min(n_el, c0 + chunk);
      for (int64_t j = c0; j < c1; j++) w[j] = r.normal() * std;
    }
  }
  params_changed();
}

const int32_t* IncrementalDecoder::forward_argmax(const int32_t* tokens, int n, int vocab_limit) {
  const float* logits = forward(tokens, n);
  const int V = config().vocab_size;
  argmax_.resize(size_t(batch()));
  for (int b = 0; b < batch(); b++) argmax_[size_t(b)] = argmax(logits + int64_t(b) * V, vocab_limit);
  return argmax_.data();
}

// ---- training ----

Transformer::Transformer(const ModelConfig& cfg, const ModelOptions& opt)
    : cfg_(cfg), table_(model_param_table(cfg)), be_(nn::make_cpu_backend(opt.lowp)) {
  cfg_.validate("model config");
  KILN_CHECK(!opt.cuda, "the Transformer runs on the CPU backend");
  params_buf_.resize(table_.total * sizeof(float));
  params_ = params_buf_.f32();
  if (opt.with_grads) {
    grads_buf_.resize(table_.total * sizeof(float));
    grads_ = grads_buf_.f32();
  }
  if (opt.lowp) params16_.assign(table_.total, 0);
  inv_freq_ = cfg_.rope_inv_freq();
  w_.bind(cfg_, table_, params_, grads_, params16_.empty() ? nullptr : params16_.data(), inv_freq_.data());
}

Transformer::~Transformer() = default;

void Transformer::params_changed() {
  if (params16_.empty()) return;
  for (const ParamSpec& s : table_.specs)
    if (s.shape.ndim == 2 && s.key != "position_embd.weight")
      be_->to_lowp(params16_.data() + s.offset, params_ + s.offset, s.numel(), *be_->lowp());
}

size_t Transformer::state_bytes() const {
  return table_.total * (sizeof(float) * (grads_ ? 2 : 1) + (params16_.empty() ? 0 : 2));
}

ParamBlocks Transformer::blocks() {
  return {params_, grads_, params16_.empty() ? nullptr : params16_.data(), table_.total, be_.get()};
}

void Transformer::Activations::allocate(nn::Workspace& ws, const ModelConfig& cfg, int64_t N, RecomputePolicy pol,
                                        int64_t ch) {
  const int C = cfg.d_model, L = cfg.n_layer;
  policy = pol;
  max_tokens = N;
  // Recomputation trades time for memory; then the logits (N×V, often the largest activation) are held
  // 64 rows at a time unless asked otherwise.
  if (ch <= 0 && pol.kind != RecomputePolicy::None) ch = 64;
  chunk = (ch <= 0 || ch > N) ? N : ch;
  const bool selective = pol.kind == RecomputePolicy::Selective;
  const int kept = pol.kind == RecomputePolicy::Every ? std::min(pol.k, L) : L;
  nn::BlockShape S;
  S.C = C;
  S.NH = cfg.n_head;
  S.NKV = cfg.n_kv_head;
  S.HD = cfg.head_dim;
  S.F = cfg.d_ff;
  S.gated = cfg.gated_ffn;
  S.qk_norm = cfg.qk_norm;
  encoded = ws.f32(N * C);
  blocks.assign(size_t(kept), {});
  out.assign(size_t(kept), nullptr);
  for (int i = 0; i < kept; i++) {
    blocks[size_t(i)].allocate(ws, N, S, selective);
    out[size_t(i)] = ws.f32(N * C);
  }
  ckpt_in.clear();
  if (pol.kind == RecomputePolicy::Every) {
    ckpt_in.push_back(encoded);
    for (int s = pol.k; s < L; s += pol.k) ckpt_in.push_back(ws.f32(N * C));
    final_out = ws.f32(N * C);
  } else {
    final_out = L ? out.back() : encoded;
  }
  lnf_out = ws.act(N * C);
  lnf_mean = ws.f32(N);
  lnf_rstd = ws.f32(N);
  dlnf = ws.act(N * C);
  logits = ws.act(chunk * cfg.vocab_size);
  losses = ws.f32(N);
  dres = ws.f32(N * C);
  scratch.allocate(ws, N, S, selective);
}

size_t Transformer::plan_bytes(const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk) {
  nn::Workspace measure;
  Activations a;
  a.allocate(measure, cfg, N, policy, lm_head_chunk);
  return measure.peak();
}

size_t Transformer::plan(int B, int T, RecomputePolicy policy, int lm_head_chunk) {
  KILN_CHECK(T <= cfg_.max_positions, "sequence length ", T, " exceeds the model's context of ", cfg_.max_positions,
             " positions");
  const int64_t N = int64_t(B) * T;
  ws_ = nn::Workspace(*be_, plan_bytes(cfg_, N, policy, lm_head_chunk), "activations");
  a_.allocate(ws_, cfg_, N, policy, lm_head_chunk);
  return ws_.capacity();
}

void Transformer::run_blocks_forward(const AttentionParams& attn, int64_t N) {
  const int L = cfg_.n_layer;
  const float* x = a_.encoded;
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = 0; l < L; l++) {
      w_.blocks[size_t(l)].forward(*be_, a_.out[size_t(l)], x, a_.blocks[size_t(l)], a_.scratch, last_pos_, attn, N);
      x = a_.out[size_t(l)];
    }
    return;
  }
  // every:K: block outputs go where they are kept (a segment's input, or the final output); the rest,
  // and the activations, use the segment buffers and are overwritten.
  const int K = a_.policy.k;
  for (int l = 0; l < L; l++) {
    float* y = l == L - 1 ? a_.final_out : ((l + 1) % K == 0 ? a_.ckpt_in[size_t((l + 1) / K)] : a_.out[size_t(l % K)]);
    w_.blocks[size_t(l)].forward(*be_, y, x, a_.blocks[size_t(l % K)], a_.scratch, last_pos_, attn, N);
    x = y;
  }
}

void Transformer::lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  nn::Weight head = w_.head;
  for (int64_t r0 = 0; r0 < N; r0 += a_.chunk) {
    const int64_t rows = std::min(a_.chunk, N - r0);
    const nn::Act x = a_.lnf_out.at(r0 * C);
    be_->linear_forward(a_.logits, x, head, rows);
    if (!targets) continue;
    be_->softmax_crossentropy(a_.logits, a_.losses + r0, targets + r0, rows, V, V, grad_scale);
    if (grad_scale == 0.0f) continue;
    // The logits now hold their gradient: dlnf = dlogits · W, dW += dlogitsᵀ · lnf.
    be_->linear_backward(a_.dlnf.at(r0 * C), a_.logits, x, head, rows);
  }
  if (targets)
    for (int64_t i = 0; i < N; i++) *loss_sum += a_.losses[i];
}

double Transformer::forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets,
                            const AttentionParams& attn, float grad_scale) {
  const int64_t N = attn.cu_seqlens ? attn.cu_seqlens[attn.num_seqs] : int64_t(attn.B) * attn.T;
  KILN_CHECK(N <= a_.max_tokens, "batch of ", N, " tokens exceeds the planned ", a_.max_tokens, " (call plan first)");
  KILN_CHECK(grad_scale == 0.0f || grads_, "training forward on a model built without gradients");
  const int C = cfg_.d_model;
  last_N_ = N;
  last_attn_ = attn;
  last_tokens_ = tokens;
  last_pos_ = pos;
  be_->embedding_forward(a_.encoded, tokens, pos, w_.wte, w_.wpe, N, C);
  run_blocks_forward(attn, N);
  w_.final_norm.forward(*be_, a_.lnf_out, a_.lnf_mean, a_.lnf_rstd, a_.final_out, N);
  double sum = 0;
  lm_head(targets, grad_scale, N, &sum);
  return sum;
}

void Transformer::backward() {
  KILN_CHECK(grads_, "backward on a model built without gradients");
  const int64_t N = last_N_;
  const int C = cfg_.d_model, L = cfg_.n_layer;
  const int32_t* pos = last_pos_;
  std::memset(a_.dres, 0, size_t(N) * C * sizeof(float));
  w_.final_norm.backward(*be_, a_.dres, a_.dlnf, a_.final_out, a_.lnf_mean, a_.lnf_rstd, N);
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = L - 1; l >= 0; l--) {
      const float* x = l ? a_.out[size_t(l - 1)] : a_.encoded;
      w_.blocks[size_t(l)].backward(*be_, a_.dres, x, a_.blocks[size_t(l)], a_.scratch, pos, last_attn_, N);
    }
  } else {
    const int K = a_.policy.k;
    for (int seg = (L - 1) / K; seg >= 0; seg--) {
      const int s = seg * K, e = std::min(L, s + K);
      // Recompute the segment's forward from its kept input, keeping every activation this time.
      const float* x = a_.ckpt_in[size_t(seg)];
      for (int l = s; l < e; l++) {
        float* y = l == e - 1 ? nullptr : a_.out[size_t(l - s)];  // the segment's output is not needed
        w_.blocks[size_t(l)].forward(*be_, y, x, a_.blocks[size_t(l - s)], a_.scratch, pos, last_attn_, N);
        x = y;
      }
      for (int l = e - 1; l >= s; l--) {
        const float* in = l == s ? a_.ckpt_in[size_t(seg)] : a_.out[size_t(l - s - 1)];
        w_.blocks[size_t(l)].backward(*be_, a_.dres, in, a_.blocks[size_t(l - s)], a_.scratch, pos, last_attn_, N);
      }
    }
  }
  be_->embedding_backward(w_.dwte, w_.dwpe, a_.dres, last_tokens_, pos, N, C);
}

void Transformer::zero_grad() {
  if (grads_) std::memset(grads_, 0, table_.total * sizeof(float));
}

const float* Transformer::logits() const { return a_.logits.f32(); }

// ---- decoding ----

TransformerDecoder::TransformerDecoder(const ModelConfig& cfg, const float* params, int batch, int max_positions)
    : cfg_(cfg), table_(model_param_table(cfg)), be_(nn::make_cpu_backend()), batch_(batch) {
  cfg_.validate("decoder config");
  KILN_CHECK(batch >= 1, "decoder: batch must be at least 1, got ", batch);
  max_pos_ = max_positions > 0 ? max_positions : cfg_.max_positions;
  KILN_CHECK(max_pos_ <= cfg_.max_positions, "decoder: max_positions ", max_pos_,
             " exceeds the model's context of ", cfg_.max_positions);
  inv_freq_ = cfg_.rope_inv_freq();
  w_.bind(cfg_, table_, params, nullptr, nullptr, inv_freq_.data());
  const size_t cache = size_t(cfg_.n_layer) * size_t(batch) * size_t(max_pos_) * size_t(cfg_.kv_dim()) * sizeof(float);
  k_.resize(cache);
  v_.resize(cache);
}

void TransformerDecoder::ensure_rows(int64_t rows) {
  if (rows <= rows_) return;
  const int C = cfg_.d_model;
  nn::BlockShape S = w_.blocks.empty() ? nn::BlockShape{} : w_.blocks[0].shape;
  auto carve = [&](nn::Workspace& ws) {
    x_ = ws.f32(rows * C);
    last_ = ws.f32(int64_t(batch_) * C);
    ln_ = ws.act(rows * C);
    mean_ = ws.f32(rows);
    rstd_ = ws.f32(rows);
    a_.allocate(ws, rows, S);
    a_.h = nullptr;  // the stream is updated in place
  };
  nn::Workspace measure;
  carve(measure);
  ws_ = nn::Workspace(*be_, measure.peak(), "decoder activations");
  carve(ws_);
  rows_ = rows;
}

void TransformerDecoder::run_chunk(const int32_t* tokens, int n, int64_t tok_stride) {
  const int B = batch_, C = cfg_.d_model, V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * n;
  ensure_rows(N);
  tok_.resize(size_t(N));
  pos_.resize(size_t(N));
  past_.assign(size_t(B), length_);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < n; i++) {
      const int32_t t = tokens[b * tok_stride + i];
      KILN_CHECK(t >= 0 && t < V, "token id ", t, " is outside the model's vocabulary [0, ", V, ")");
      tok_[size_t(b * n + i)] = t;
      pos_[size_t(b * n + i)] = length_ + i;
    }
  be_->embedding_forward(x_, tok_.data(), pos_.data(), w_.wte, w_.wpe, N, C);
  // A fresh prompt attends within itself (FlashAttention over B rows of n); later tokens attend to the cache.
  AttentionParams flash;
  flash.B = B;
  flash.T = n;
  flash.NH = cfg_.n_head;
  flash.NKV = cfg_.n_kv_head;
  flash.HD = cfg_.head_dim;
  flash.window = cfg_.sliding_window;
  flash.scale = cfg_.attention_scale();
  const int64_t layer_cache = int64_t(B) * max_pos_ * cfg_.kv_dim();
  for (int l = 0; l < cfg_.n_layer; l++) {
    nn::KVLayer cache;
    cache.k = k_.f32() + l * layer_cache;
    cache.v = v_.f32() + l * layer_cache;
    cache.batch_stride = int64_t(max_pos_) * cfg_.kv_dim();
    cache.past = past_.data();
    cache.B = B;
    cache.Tq = n;
    cache.fresh = length_ == 0 && n > 1;
    w_.blocks[size_t(l)].forward(*be_, x_, x_, a_, s_, pos_.data(), flash, N, &cache);
  }
  length_ += n;
}

// logits[rows, V] = FinalNorm(hidden) · Wᵀ.
void TransformerDecoder::lm_head(const float* hidden, int64_t rows, float* logits) {
  w_.final_norm.forward(*be_, ln_, mean_, rstd_, hidden, rows);
  be_->linear_forward(nn::Act{logits, DType::F32}, ln_, w_.head, rows);
}

const float* TransformerDecoder::forward(const int32_t* tokens, int n, bool all_logits) {
  KILN_CHECK(n >= 1, "decoder: forward needs at least one token per sequence");
  KILN_CHECK(int64_t(length_) + n <= max_pos_, "decoder: ", length_, " cached + ", n,
             " new positions exceed the context of ", max_pos_, " positions");
  const int B = batch_, C = cfg_.d_model, V = cfg_.vocab_size;
  logits_.resize(size_t(B) * size_t(all_logits ? n : 1) * size_t(V));
  for (int c0 = 0; c0 < n; c0 += kMaxChunk) {
    const int m = std::min(kMaxChunk, n - c0);
    run_chunk(tokens + c0, m, n);
    if (all_logits) {
      // Rows of this chunk are [B][m]; their logits go to [B][n][V] at column c0.
      std::vector<float> chunk_logits(size_t(B) * m * V);
      lm_head(x_, int64_t(B) * m, chunk_logits.data());
      for (int b = 0; b < B; b++)
        std::memcpy(logits_.data() + (size_t(b) * n + c0) * V, chunk_logits.data() + size_t(b) * m * V,
                    sizeof(float) * size_t(m) * V);
    } else if (c0 + m == n) {
      for (int b = 0; b < B; b++)
        std::memcpy(last_ + int64_t(b) * C, x_ + (int64_t(b) * m + m - 1) * C, sizeof(float) * size_t(C));
      lm_head(last_, B, logits_.data());
    }
  }
  return logits_.data();
}

}  // namespace kiln
