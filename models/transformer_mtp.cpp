// The Transformer's multi-token prediction (nn/mtp.h): the shifted inputs and targets of each depth, the modules'
// forward through the shared head with the weighted loss, and their backward into the main model's last hidden
// state. loss = main + λ/D · Σ_k MTP_k, each term a sum over the batch's targets like the main one.
#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "models/transformer.h"

namespace kiln {

void Transformer::mtp_forward(const int32_t* host_targets, const AttentionParams& attn, float grad_scale, int64_t N,
                              double* sum) {
  const int D = cfg_.mtp_depth;
  int64_t total = 0;
  const std::vector<AttentionSpan> spans = attention_spans(attn, total);
  // Depth k at position i reads token t_{i+k} (= target i+k−1) and predicts t_{i+k+1} (= target i+k), within
  // its sequence; positions without either are ignored (target −1, token 0).
  mtp_host_.assign(size_t(D) * 2 * size_t(N), 0);
  mtp_tokens_.assign(size_t(D), nullptr);
  for (int k = 1; k <= D; k++) {
    int32_t* tok = mtp_host_.data() + size_t(k - 1) * 2 * size_t(N);
    int32_t* tgt = tok + N;
    for (const AttentionSpan& sp : spans)
      for (int64_t i = 0; i < sp.len; i++) {
        const int64_t j = sp.start + i;
        const int32_t src = i + k - 1 < sp.len ? host_targets[j + k - 1] : -1;
        tok[j] = src >= 0 ? src : 0;
        tgt[j] = src >= 0 && i + k < sp.len ? host_targets[j + k] : -1;
      }
  }
  be_->memset(a_.mtp_scratch.zeros, 0, size_t(N) * cfg_.d_model * sizeof(float));
  const float scale = grad_scale * mtp_lambda_ / float(D);
  const float* prev = a_.final_out;
  double mtp_sum = 0;
  for (int k = 0; k < D; k++) {
    const int32_t* tok = mtp_host_.data() + size_t(k) * 2 * size_t(N);
    const size_t bytes = size_t(N) * sizeof(int32_t);
    mtp_tokens_[size_t(k)] =
        static_cast<const int32_t*>(be_->from_host(a_.mtp_tokens ? a_.mtp_tokens + k * N : nullptr, tok, bytes));
    const int32_t* tgt =
        static_cast<const int32_t*>(be_->from_host(a_.mtp_targets ? a_.mtp_targets + k * N : nullptr, tok + N, bytes));
    nn::MTPActivations& a = a_.mtp[size_t(k)];
    w_.mtp[size_t(k)].forward(*be_, a, a_.scratch, prev, mtp_tokens_[size_t(k)], w_.wte, last_pos_, last_attn_, N,
                              a_.mtp_scratch.zeros);
    count_load(cfg_.n_layer + k, a.blk);  // a MoE block inside the module: its expert load and bias update
    double s = 0;
    lm_head(tgt, scale, N, &s, a.ln, a.dln);
    mtp_sum += s;
    prev = a.h;
  }
  last_mtp_ = mtp_sum / D;
  *sum += double(mtp_lambda_) / D * mtp_sum;
  mtp_ran_ = grad_scale != 0.0f;
}

// Depth D first: each module's dL/dprev feeds the one before it, the first module's the main model's dres.
void Transformer::mtp_backward() {
  const int D = cfg_.mtp_depth;
  const int64_t N = last_N_;
  for (int k = 0; k < D; k++) be_->memset(a_.mtp[size_t(k)].dres, 0, size_t(N) * cfg_.d_model * sizeof(float));
  for (int k = D - 1; k >= 0; k--) {
    const float* prev = k ? a_.mtp[size_t(k - 1)].h : a_.final_out;
    float* dprev = k ? a_.mtp[size_t(k - 1)].dres : a_.dres;
    w_.mtp[size_t(k)].backward(*be_, dprev, a_.mtp[size_t(k)], a_.scratch, a_.mtp_scratch, prev,
                               mtp_tokens_[size_t(k)], w_.dwte, last_pos_, last_attn_, N);
  }
}

std::vector<std::pair<std::string, double>> Transformer::loss_parts() const {
  if (cfg_.mtp_depth == 0) return {};
  return {{"main_loss", last_main_}, {"mtp_loss", last_mtp_}};
}

}  // namespace kiln

namespace kiln {

void TransformerDecoder::note_tokens(const int32_t* tokens, int n) {
  if (cfg_.mtp_depth == 0 || n < 1) return;
  last_tokens_.assign(tokens, tokens + size_t(batch_) * size_t(n));
  last_n_ = n;
  last_start_ = length_;
  const int limit = length_ == 0 ? kMaxChunk : std::min(kMaxChunk, be_->max_decode_queries());
  last_one_chunk_ = n <= limit;
}

// Module 1 at positions p .. p+m−1 of the last forward (p its first position): h_i (still in x_, the stream
// before the final norm) and the embedding of token i+1 (the next input, or `next` for the last), attending
// over its own cache.
const float* TransformerDecoder::draft(const int32_t* next, int m) {
  KILN_CHECK(cfg_.mtp_depth > 0, "decoder: draft() needs multi-token-prediction modules (", cfg_.family,
             " model without num_nextn_predict_layers)");
  const int n = last_n_, B = batch_, C = cfg_.d_model, V = cfg_.vocab_size, p = last_start_;
  if (m == 0) m = n;
  KILN_CHECK(n > 0 && mtp_length_ == p,
             "decoder: draft() follows each forward() (the draft's cache holds ", mtp_length_, " positions, the ",
             "last forward started at ", p, ")");
  KILN_CHECK(m >= 1 && m <= n && length_ >= p + m, "decoder: draft() over ", m, " positions of a forward of ", n,
             " of which the cache keeps ", length_ - p);
  KILN_CHECK(last_one_chunk_, "decoder: draft() after a forward of ", n, " positions (more than one chunk of ",
             kMaxChunk, ")");
  const int64_t N = int64_t(B) * m;
  // The module's input rows: x_ holds [B][n] rows; with m < n the first m of each sequence, packed.
  const float* prev = x_;
  if (m < n) {
    be_->copy_rows(nn::Act{mtp_prev_, DType::F32}, int64_t(m) * C, nn::Act{x_, DType::F32}, int64_t(n) * C, B,
                   int64_t(m) * C);
    prev = mtp_prev_;
  }
  inputs_.resize(size_t(2 * N + B));
  for (int b = 0; b < B; b++) {
    KILN_CHECK(next[b] >= 0 && next[b] < V, "token id ", next[b], " is outside the model's vocabulary [0, ", V, ")");
    inputs_[size_t(2 * N + b)] = p;
    for (int i = 0; i < m; i++) {
      inputs_[size_t(b * m + i)] = i + 1 < m ? last_tokens_[size_t(b * n + i + 1)] : next[b];
      inputs_[size_t(N + b * m + i)] = p + i;
    }
  }
  const int32_t* tok =
      static_cast<const int32_t*>(be_->from_host(inputs_d_, inputs_.data(), inputs_.size() * sizeof(int32_t)));
  nn::KVLayer cache;
  cache.k = nn::Act{mtp_k_.data(), be_->act_dtype()};
  cache.v = nn::Act{mtp_v_.data(), be_->act_dtype()};
  cache.batch_stride = int64_t(max_pos_) * cache_width();
  cache.past = tok + 2 * N;
  cache.max_positions = max_pos_;
  cache.B = B;
  cache.Tq = m;
  cache.fresh = p == 0 && m > 1;
  cache.absorbed = absorbed_;
  if (cfg_.mla.on() && expand_.data()) {  // the plain form's expansion buffers, shared with the main layers
    const nn::MLAShape M = block_shape(cfg_, 0).mla;
    const int64_t P = max_pos_;
    const nn::Act e{expand_.data(), be_->act_dtype()};
    cache.expand_c = e;
    cache.expand_kv = e.at(P * M.r);
    cache.expand_k = e.at(P * (M.r + M.kv()));
    cache.expand_v = e.at(P * (M.r + M.kv()) + int64_t(B) * P * M.NH * M.qk());
  }
  be_->memset(mtp_zeros_, 0, size_t(N) * C * sizeof(float));
  w_.mtp[0].forward(*be_, mtp_a_, s_, prev, tok, w_.wte, tok + N, attention_params(cfg_, B, m), N, mtp_zeros_,
                    &cache);
  mtp_length_ = p + m;
  // The last position's head input of each sequence, through the shared head.
  be_->copy_rows(ln_, C, mtp_a_.ln.at(int64_t(m - 1) * C), int64_t(m) * C, B, C);
  be_->linear_forward(nn::Act{logits_d_, DType::F32}, ln_, w_.head, B);
  const size_t bytes = sizeof(float) * size_t(B) * size_t(V);
  if (!be_->on_host()) logits_.resize(bytes / sizeof(float));
  return static_cast<const float*>(be_->to_host(logits_.data(), logits_d_, bytes));
}

}  // namespace kiln
