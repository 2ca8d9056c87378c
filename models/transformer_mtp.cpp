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

// After a plain chunk at positions start .. start+n−1 (batch 1): its tokens, and its hidden states (x_, the
// stream before the final norm) as depth 0's input. Module 1's entries from `start` on read other hidden states
// now.
void TransformerDecoder::note_forward(const int32_t* tokens, int start, int n) {
  if (self_draft_depth() == 0) return;
  const int C = cfg_.d_model;
  tok_hist_.resize(size_t(start));
  tok_hist_.insert(tok_hist_.end(), tokens, tokens + n);
  be_->copy_rows(nn::Act{mtp_hist_.as<float>() + int64_t(start) * C, DType::F32}, C, nn::Act{x_, DType::F32}, C, n,
                 C);
  if (hidden_len_ >= start) hidden_len_ = start + n;
  mtp_dirty_[0] = std::min(mtp_dirty_[0], start);
}

void TransformerDecoder::mtp_forget(int length) {
  if (self_draft_depth() == 0) return;
  for (int& l : mtp_len_) l = std::min(l, length);
  hidden_len_ = std::min(hidden_len_, length);
  if (int(tok_hist_.size()) > length) tok_hist_.resize(size_t(length));
  round_len_ = -1;
}

// Module k (1-based) over positions [start, end) of its cache, in pieces as the main layers take them: each
// position i reads depth k−1's hidden state at i and the embedding of token i+k (the main cache's, or past it
// this round's inputs), writes its key and value at i, and (below the last module) its output as depth k's
// hidden state. Leaves the head's input of position end−1 in mtp_a_.ln's last row of the last piece.
void TransformerDecoder::mtp_run(int k, int start, int end) {
  const int C = cfg_.d_model, L = length_;
  const int64_t width = cache_width();
  const size_t one = size_t(max_pos_) * size_t(width);  // one module's cache, in elements
  float* hist = mtp_hist_.as<float>();
  std::vector<int32_t>& used = mtp_used_[size_t(k - 1)];
  int m = 0;
  for (int p = start; p < end; p += m) {
    // An empty cache takes a whole piece through FlashAttention, later ones the decode attention.
    const int limit = p == 0 ? kMaxChunk : std::min(kMaxChunk, be_->max_decode_queries());
    m = std::min(limit, end - p);
    ensure_rows(m);
    inputs_.resize(size_t(2 * m + 1));
    for (int i = 0; i < m; i++) {
      const int at = p + i + k;  // the token module k reads at position p+i
      const int32_t t = at < L ? tok_hist_[size_t(at)] : round_in_[size_t(at - L)];
      inputs_[size_t(i)] = t;
      used[size_t(p + i)] = t;
      inputs_[size_t(m + i)] = p + i;
    }
    inputs_[size_t(2 * m)] = p;
    const int32_t* tok =
        static_cast<const int32_t*>(be_->from_host(inputs_d_, inputs_.data(), inputs_.size() * sizeof(int32_t)));
    nn::KVLayer cache;
    cache.k = nn::Act{mtp_k_.data(), be_->act_dtype()}.at(int64_t(k - 1) * int64_t(one));
    if (mtp_v_.data()) cache.v = nn::Act{mtp_v_.data(), be_->act_dtype()}.at(int64_t(k - 1) * int64_t(one));
    cache.batch_stride = int64_t(max_pos_) * width;
    cache.past = tok + 2 * m;
    cache.max_positions = max_pos_;
    cache.B = 1;
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
      cache.expand_v = e.at(P * (M.r + M.kv()) + P * M.NH * M.qk());
    }
    be_->memset(mtp_zeros_, 0, size_t(m) * C * sizeof(float));
    const float* prev = hist + (int64_t(k - 1) * max_pos_ + p) * C;
    w_.mtp[size_t(k - 1)].forward(*be_, mtp_a_, s_, prev, tok, w_.wte, tok + m, attention_params(cfg_, 1, m), m,
                                  mtp_zeros_, &cache);
    if (k < cfg_.mtp_depth)
      be_->copy_rows(nn::Act{hist + (int64_t(k) * max_pos_ + p) * C, DType::F32}, C,
                     nn::Act{mtp_a_.h, DType::F32}, C, m, C);
  }
  // The head's input of the last position.
  be_->copy_rows(ln_, C, mtp_a_.ln.at(int64_t(m - 1) * C), C, 1, C);
}

const float* TransformerDecoder::self_draft(int k, int32_t token) {
  const int D = self_draft_depth(), L = length_, V = cfg_.vocab_size;
  KILN_CHECK(D > 0, "decoder: self-drafting needs multi-token-prediction modules and batch 1 (", cfg_.family,
             " model with ", cfg_.mtp_depth, " modules, batch ", batch_, ")");
  KILN_CHECK(k >= 1 && k <= D, "decoder: draft ", k, " of a model with ", D, " multi-token-prediction modules");
  KILN_CHECK(k == 1 || (round_len_ == L && int(round_in_.size()) == k - 1), "decoder: draft ", k,
             " follows drafts 1 .. ", k - 1, " of the same round");
  KILN_CHECK(L >= 1 && hidden_len_ >= L, "decoder: self-drafting needs the main model's hidden state at every ",
             "cached position (", hidden_len_, " of ", L, "; a plain forward after a tree)");
  KILN_CHECK(token >= 0 && token < V, "token id ", token, " is outside the model's vocabulary [0, ", V, ")");
  if (k == 1) round_in_.clear(), round_len_ = L;
  round_in_.push_back(token);
  // The module's valid prefix: entries before any position whose input hidden state changed, and before the
  // first one that read another token than the one there now (a rejected draft of an earlier round).
  const std::vector<int32_t>& used = mtp_used_[size_t(k - 1)];
  int start = std::min({mtp_len_[size_t(k - 1)], mtp_dirty_[size_t(k - 1)], L});
  for (int i = 0; i < start; i++) {
    const int at = i + k;
    if (used[size_t(i)] != (at < L ? tok_hist_[size_t(at)] : round_in_[size_t(at - L)])) {
      start = i;
      break;
    }
  }
  // Position L−1 always runs: its logits are the guess (and with k > 1 it reads this round's drafts).
  start = std::min(start, L - 1);
  mtp_run(k, start, L);
  mtp_len_[size_t(k - 1)] = L;
  mtp_dirty_[size_t(k - 1)] = max_pos_;
  if (k < D) mtp_dirty_[size_t(k)] = std::min(mtp_dirty_[size_t(k)], start);
  be_->linear_forward(nn::Act{logits_d_, DType::F32}, ln_, w_.head, 1);
  const size_t bytes = sizeof(float) * size_t(V);
  if (!be_->on_host()) logits_.resize(size_t(V));
  return static_cast<const float*>(be_->to_host(logits_.data(), logits_d_, bytes));
}

}  // namespace kiln
