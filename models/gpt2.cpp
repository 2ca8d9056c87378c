#include "models/gpt2.h"

#include <cmath>
#include <cstring>

#include "core/rng.h"
#include "kernels/activation.h"
#include "kernels/crossentropy.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"

namespace kiln {

GPT2::GPT2(const GPT2Config& cfg, bool with_grads) : cfg_(cfg), table_(ParamTable::gpt2(cfg)) {
  cfg_.validate("model config");
  params_.resize(table_.total * sizeof(float));
  p_ = GPT2Params::bind(table_, params_.f32(), cfg_.n_layer);
  if (with_grads) {
    grads_.resize(table_.total * sizeof(float));
    g_ = GPT2Params::bind(table_, grads_.f32(), cfg_.n_layer);
  }
  const int C = cfg_.n_embd;
  for (int l = 0; l < cfg_.n_layer; l++)
    blocks_.push_back(nn::Block::bind(p_.layers[l], with_grads ? &g_.layers[l] : nullptr, C, cfg_.n_head,
                                      cfg_.layer_norm_epsilon));
  lnf_ = {p_.lnf_w, p_.lnf_b, with_grads ? g_.lnf_w : nullptr, with_grads ? g_.lnf_b : nullptr, C,
          cfg_.layer_norm_epsilon};
}

void GPT2::init_random(uint64_t seed) {
  const float std_resid = 0.02f / std::sqrt(2.0f * float(cfg_.n_layer));
  for (size_t i = 0; i < table_.specs.size(); i++) {
    const ParamSpec& s = table_.specs[i];
    float* w = params_.f32() + s.offset;
    const std::string& n = s.name;
    auto ends_with = [&](const char* suf) {
      size_t k = std::strlen(suf);
      return n.size() >= k && n.compare(n.size() - k, k, suf) == 0;
    };
    if (s.shape.ndim == 1) {
      float v = (ends_with("ln_1.weight") || ends_with("ln_2.weight") || ends_with("ln_f.weight")) ? 1.0f : 0.0f;
      for (int64_t j = 0; j < s.numel(); j++) w[j] = v;
      continue;
    }
    float std = (ends_with("attn.c_proj.weight") || ends_with("mlp.c_proj.weight")) ? std_resid : 0.02f;
    // One Philox stream per tensor, chunked so threads fill disjoint ranges deterministically.
    const int64_t n_el = s.numel(), chunk = 1 << 16;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n_el; c0 += chunk) {
      Rng r(seed * 0x9E3779B97F4A7C15ull + i, uint64_t(c0) * 2);
      int64_t c1 = std::min(n_el, c0 + chunk);
      for (int64_t j = c0; j < c1; j++) w[j] = r.normal() * std;
    }
  }
}

void GPT2::allocate_activations(Arena& a, int64_t N) {
  const int C = cfg_.n_embd;
  encoded_ = a.alloc(N * C);
  block_acts_.resize(cfg_.n_layer);
  block_out_.resize(cfg_.n_layer);
  for (int l = 0; l < cfg_.n_layer; l++) {
    block_acts_[l].allocate(a, N, C, cfg_.n_head);
    block_out_[l] = a.alloc(N * C);
  }
  lnf_out_ = a.alloc(N * C);
  lnf_mean_ = a.alloc(N);
  lnf_rstd_ = a.alloc(N);
  logits_ = a.alloc(N * cfg_.vocab_size);
  losses_ = a.alloc(N);
  dres_ = a.alloc(N * C);
  scratch_.allocate(a, N, C);
}

size_t GPT2::plan(int B, int T) {
  KILN_CHECK(T <= cfg_.n_positions, "sequence length ", T, " exceeds the model's n_positions ", cfg_.n_positions);
  int64_t N = int64_t(B) * T;
  if (N == max_tokens_) return acts_.capacity();
  Arena measure;
  allocate_activations(measure, N);
  acts_ = Arena(measure.peak());
  allocate_activations(acts_, N);
  max_tokens_ = N;
  return acts_.capacity();
}

AttentionParams GPT2::attention_params(int B, int T) const {
  AttentionParams ap;
  ap.B = B;
  ap.T = T;
  ap.NH = cfg_.n_head;
  ap.HD = cfg_.head_dim();
  ap.causal = true;
  ap.scale = 1.0f / std::sqrt(float(ap.HD));
  return ap;
}

double GPT2::forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                     float grad_scale) {
  const int64_t N = attn.cu_seqlens ? attn.cu_seqlens[attn.num_seqs] : int64_t(attn.B) * attn.T;
  KILN_CHECK(N <= max_tokens_, "batch of ", N, " tokens exceeds the planned ", max_tokens_, " (call plan first)");
  const int C = cfg_.n_embd, V = cfg_.vocab_size;
  last_N_ = N;
  last_attn_ = attn;

  cpu::embedding_forward(encoded_, tokens, pos, p_.wte, p_.wpe, N, C);
  const float* x = encoded_;
  for (int l = 0; l < cfg_.n_layer; l++) {
    blocks_[l].forward(block_out_[l], x, block_acts_[l], attn, N);
    x = block_out_[l];
  }
  lnf_.forward(lnf_out_, lnf_mean_, lnf_rstd_, x, N);
  // Tied LM head: logits[N, V] = lnf · wteᵀ
  cpu::gemm(false, true, N, V, C, 1.0f, lnf_out_, C, p_.wte, C, 0.0f, logits_, V);
  if (!targets) return 0.0;
  cpu::softmax_crossentropy(logits_, losses_, targets, N, V, V, grad_scale);
  double sum = 0;
  for (int64_t i = 0; i < N; i++) sum += losses_[i];
  return sum;
}

void GPT2::backward(const int32_t* tokens, const int32_t* pos) {
  KILN_CHECK(grads_.data(), "backward on a model built without gradients");
  const int64_t N = last_N_;
  const int C = cfg_.n_embd, V = cfg_.vocab_size;
  // LM head: dlnf = dlogits · wte ; dwte += dlogitsᵀ · lnf
  float* dlnf = scratch_.d_ln;
  cpu::gemm(false, false, N, C, V, 1.0f, logits_, V, p_.wte, C, 0.0f, dlnf, C);
  cpu::gemm(true, false, V, C, N, 1.0f, logits_, V, lnf_out_, C, 1.0f, g_.wte, C);
  std::memset(dres_, 0, size_t(N) * C * sizeof(float));
  const float* x_last = cfg_.n_layer ? block_out_[cfg_.n_layer - 1] : encoded_;
  lnf_.backward(dres_, dlnf, x_last, lnf_mean_, lnf_rstd_, N);
  for (int l = cfg_.n_layer - 1; l >= 0; l--) {
    const float* x = l ? block_out_[l - 1] : encoded_;
    blocks_[l].backward(dres_, x, block_acts_[l], scratch_, last_attn_, N);
  }
  cpu::embedding_backward(g_.wte, g_.wpe, dres_, tokens, pos, N, C);
}

void GPT2::zero_grad() {
  if (grads_.data()) std::memset(grads_.data(), 0, table_.total * sizeof(float));
}

}  // namespace kiln
