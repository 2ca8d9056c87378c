#include "infer/decoder.h"
#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/gemv.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"

namespace kiln {
namespace {

// out[N, OC] = x[N, C] · W[C, OC] + b. One row is a matrix-vector product (kernels/gemv.h), streaming W once.
void linear(float* out, const float* x, const float* W, const float* b, int64_t N, int C, int OC) {
  if (N == 1)
    cpu::vecmat(out, x, W, b, C, OC, /*accumulate=*/false);
  else
    cpu::matmul_forward(out, x, W, b, N, C, OC);
}

// The residual update res[N, OC] += x[N, C] · W[C, OC] + b, accumulated straight into the residual stream
// (beta = 1), so the branch output needs no buffer of its own and no separate add.
void residual_linear(float* res, const float* x, const float* W, const float* b, int64_t N, int C, int OC) {
  if (N == 1) {
    cpu::vecmat(res, x, W, b, C, OC, /*accumulate=*/true);
    return;
  }
  cpu::gemm(false, false, N, OC, C, 1.0f, x, C, W, OC, 1.0f, res, OC);
  for (int64_t n = 0; n < N; n++) {
    float* r = res + n * OC;
#pragma omp simd
    for (int o = 0; o < OC; o++) r[o] += b[o];
  }
}

}  // namespace

const int32_t* IncrementalDecoder::forward_argmax(const int32_t* tokens, int n, int vocab_limit) {
  const float* logits = forward(tokens, n);
  const int V = config().vocab_size;
  argmax_.resize(size_t(batch()));
  for (int b = 0; b < batch(); b++) argmax_[size_t(b)] = argmax(logits + int64_t(b) * V, vocab_limit);
  return argmax_.data();
}

Decoder::Decoder(const GPT2Config& cfg, const float* params, int batch, int max_positions)
    : cfg_(cfg), table_(ParamTable::gpt2(cfg)), batch_(batch) {
  cfg_.validate("decoder config");
  KILN_CHECK(batch >= 1, "decoder: batch must be at least 1, got ", batch);
  if (max_positions <= 0) max_positions = cfg_.n_positions;
  KILN_CHECK(max_positions <= cfg_.n_positions, "decoder: max_positions ", max_positions,
             " exceeds the model's n_positions ", cfg_.n_positions);
  // The decoder only reads the block; bind() takes a mutable pointer because training writes through it.
  p_ = GPT2Params::bind(table_, const_cast<float*>(params), cfg_.n_layer);
  cache_ = KVCache(cfg_.n_layer, batch, max_positions, cfg_.n_embd);
}

void Decoder::ensure_rows(int64_t rows) {
  if (rows <= rows_) return;
  const int C = cfg_.n_embd, NH = cfg_.n_head;
  Arena measure;
  auto plan = [&](Arena& a) {
    x_ = a.alloc(rows * C);
    ln_ = a.alloc(rows * C);
    qkv_ = a.alloc(rows * 3 * C);
    atty_ = a.alloc(rows * C);
    fc_ = a.alloc(rows * 4 * C);
    mean_ = a.alloc(rows);
    rstd_ = a.alloc(rows);
    lse_ = a.alloc(int64_t(NH) * rows);
    last_ = a.alloc(int64_t(batch_) * C);
  };
  plan(measure);
  acts_ = Arena(measure.peak());
  plan(acts_);
  rows_ = rows;
}

void Decoder::run_chunk(const int32_t* tokens, int n, int64_t tok_stride) {
  const int B = batch_, C = cfg_.n_embd, NH = cfg_.n_head, HD = cfg_.head_dim(), V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * n;
  const float eps = cfg_.layer_norm_epsilon;
  ensure_rows(N);
  tok_.resize(size_t(N));
  pos_.resize(size_t(N));
  for (int b = 0; b < B; b++)
    for (int i = 0; i < n; i++) {
      const int32_t t = tokens[b * tok_stride + i];
      KILN_CHECK(t >= 0 && t < V, "token id ", t, " is outside the model's vocabulary [0, ", V, ")");
      tok_[size_t(b * n + i)] = t;
      pos_[size_t(b * n + i)] = length_ + i;
    }
  cpu::embedding_forward(x_, tok_.data(), pos_.data(), p_.wte, p_.wpe, N, C);

  AttentionParams flash;
  flash.B = B;
  flash.T = n;
  flash.NH = NH;
  flash.HD = HD;
  flash.causal = true;
  flash.scale = 1.0f / std::sqrt(float(HD));
  DecodeAttentionParams dec;
  dec.B = B;
  dec.Tq = n;
  dec.past = length_;
  dec.NH = NH;
  dec.HD = HD;
  dec.scale = flash.scale;
  dec.q = qkv_;
  dec.q_stride = 3 * C;
  dec.kv_batch_stride = cache_.batch_stride();
  dec.kv_stride = cache_.position_stride();
  dec.out = atty_;
  dec.out_stride = C;

  for (int l = 0; l < cfg_.n_layer; l++) {
    const LayerParams& lp = p_.layers[size_t(l)];
    cpu::layernorm_forward(ln_, mean_, rstd_, x_, lp.ln1_w, lp.ln1_b, N, C, eps);
    linear(qkv_, ln_, lp.qkv_w, lp.qkv_b, N, C, 3 * C);
    for (int b = 0; b < B; b++)
      for (int i = 0; i < n; i++) {
        const float* row = qkv_ + (int64_t(b) * n + i) * 3 * C;
        std::memcpy(cache_.k(l, b, length_ + i), row + C, sizeof(float) * size_t(C));
        std::memcpy(cache_.v(l, b, length_ + i), row + 2 * C, sizeof(float) * size_t(C));
      }
    if (length_ == 0 && n > 1) {
      // A fresh prompt: causal FlashAttention straight on the fused QKV rows.
      cpu::attention_forward(atty_, lse_, qkv_, flash);
    } else {
      dec.k = cache_.k(l);
      dec.v = cache_.v(l);
      cpu::decode_attention(dec);
    }
    residual_linear(x_, atty_, lp.attn_proj_w, lp.attn_proj_b, N, C, C);
    cpu::layernorm_forward(ln_, mean_, rstd_, x_, lp.ln2_w, lp.ln2_b, N, C, eps);
    linear(fc_, ln_, lp.fc_w, lp.fc_b, N, C, 4 * C);
    cpu::gelu_forward(fc_, fc_, N * 4 * C);
    residual_linear(x_, fc_, lp.fc_proj_w, lp.fc_proj_b, N, 4 * C, C);
  }
  length_ += n;
}

// logits[rows, V] = LayerNorm_f(hidden) · wteᵀ (the tied LM head).
void Decoder::lm_head(const float* hidden, int64_t rows, float* logits) {
  const int C = cfg_.n_embd, V = cfg_.vocab_size;  // rows <= rows_: ln_ has room
  cpu::layernorm_forward(ln_, mean_, rstd_, hidden, p_.lnf_w, p_.lnf_b, rows, C, cfg_.layer_norm_epsilon);
  if (rows == 1)
    cpu::matvec(logits, p_.wte, ln_, V, C);
  else
    cpu::gemm(false, true, rows, V, C, 1.0f, ln_, C, p_.wte, C, 0.0f, logits, V);
}

const float* Decoder::forward(const int32_t* tokens, int n, bool all_logits) {
  KILN_CHECK(n >= 1, "decoder: forward needs at least one token per sequence");
  KILN_CHECK(int64_t(length_) + n <= cache_.max_positions(), "decoder: ", length_, " cached + ", n,
             " new positions exceed the context of ", cache_.max_positions(), " positions");
  const int B = batch_, C = cfg_.n_embd, V = cfg_.vocab_size;
  logits_.resize(size_t(B) * size_t(all_logits ? n : 1) * size_t(V));
  for (int c0 = 0; c0 < n; c0 += kMaxChunk) {
    const int m = std::min(kMaxChunk, n - c0);
    run_chunk(tokens + c0, m, n);
    if (all_logits) {
      // Rows of this chunk are [B][m]; their logits go to [B][n][V] at column c0.
      std::vector<float> chunk_logits(size_t(B) * m * V);
      // lm_head uses ln_ as scratch; x_ holds the hidden states of the chunk.
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
