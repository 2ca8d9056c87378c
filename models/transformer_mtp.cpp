// The Transformer's multi-token prediction (nn/mtp.h): the shifted inputs and targets of each depth, the modules'
// forward through the shared head with the weighted loss, and their backward into the main model's last hidden
// state. loss = main + λ/D · Σ_k MTP_k, each term a sum over the batch's targets like the main one.
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
