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
  bind_blocks();
  const int C = cfg_.n_embd;
  lnf_ = {p_.lnf_w, p_.lnf_b, with_grads ? g_.lnf_w : nullptr, with_grads ? g_.lnf_b : nullptr, C,
          cfg_.layer_norm_epsilon};
}

void GPT2::bind_blocks() {
  const bool with_grads = grads_.data() != nullptr;
  blocks_.clear();
  for (int l = 0; l < cfg_.n_layer; l++) {
    nn::Block b = nn::Block::bind(p_.layers[l], with_grads ? &g_.layers[l] : nullptr, cfg_.n_embd, cfg_.n_head,
                                  cfg_.layer_norm_epsilon);
    if (lowp_) {
      // The 16-bit copy of a weight sits at the same offset as the fp32 original.
      auto lowp_of = [&](nn::Linear& lin) {
        lin.w_lowp = lowp_weights_.data() + (lin.w - params_.f32());
        lin.lowp = *lowp_;
        lin.scratch = lowp_scratch_.data();
      };
      lowp_of(b.qkv);
      lowp_of(b.attn_proj);
      lowp_of(b.fc);
      lowp_of(b.fc_proj);
    }
    blocks_.push_back(b);
  }
}

void GPT2::set_compute_type(std::optional<LowpType> t) {
  lowp_ = t;
  if (t) {
    lowp_weights_.assign(table_.total, 0);
    lowp_scratch_.resize(kLowpScratchBytes);
  } else {
    lowp_weights_.clear();
    lowp_scratch_.resize(0);
  }
  bind_blocks();
  refresh_lowp_weights();
}

void GPT2::refresh_lowp_weights() {
  if (!lowp_) return;
  for (const ParamSpec& s : table_.specs)
    if (s.shape.ndim == 2 && s.name != "transformer.wpe.weight")
      cpu::to_lowp(lowp_weights_.data() + s.offset, params_.f32() + s.offset, s.numel(), *lowp_);
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

void GPT2::Activations::allocate(Arena& ar, const GPT2Config& cfg, int64_t N, RecomputePolicy pol, int64_t ch) {
  const int C = cfg.n_embd, L = cfg.n_layer;
  policy = pol;
  max_tokens = N;
  // Recomputation trades time for memory; then the logits (N×V, often the largest activation) are held
  // 64 rows at a time unless asked otherwise.
  if (ch <= 0 && pol.kind != RecomputePolicy::None) ch = 64;
  chunk = (ch <= 0 || ch > N) ? N : ch;
  const bool selective = pol.kind == RecomputePolicy::Selective;
  const int kept = pol.kind == RecomputePolicy::Every ? std::min(pol.k, L) : L;
  encoded = ar.alloc(N * C);
  blocks.assign(size_t(kept), {});
  out.assign(size_t(kept), nullptr);
  for (int i = 0; i < kept; i++) {
    blocks[size_t(i)].allocate(ar, N, C, cfg.n_head, selective);
    out[size_t(i)] = ar.alloc(N * C);
  }
  ckpt_in.clear();
  if (pol.kind == RecomputePolicy::Every) {
    ckpt_in.push_back(encoded);
    for (int s = pol.k; s < L; s += pol.k) ckpt_in.push_back(ar.alloc(N * C));
    final_out = ar.alloc(N * C);
  } else {
    final_out = L ? out.back() : encoded;
  }
  lnf_out = ar.alloc(N * C);
  lnf_mean = ar.alloc(N);
  lnf_rstd = ar.alloc(N);
  dlnf = ar.alloc(N * C);
  logits = ar.alloc(chunk * cfg.vocab_size);
  losses = ar.alloc(N);
  dres = ar.alloc(N * C);
  scratch.allocate(ar, N, C, selective);
}

size_t GPT2::plan_bytes(const GPT2Config& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk) {
  Arena measure;
  Activations a;
  a.allocate(measure, cfg, N, policy, lm_head_chunk);
  return measure.peak();
}

size_t GPT2::plan(int B, int T, RecomputePolicy policy, int lm_head_chunk) {
  KILN_CHECK(T <= cfg_.n_positions, "sequence length ", T, " exceeds the model's n_positions ", cfg_.n_positions);
  const int64_t N = int64_t(B) * T;
  arena_ = Arena(plan_bytes(cfg_, N, policy, lm_head_chunk));
  a_.allocate(arena_, cfg_, N, policy, lm_head_chunk);
  return arena_.capacity();
}

AttentionParams GPT2::attention_params(int B, int T) const { return cfg_.attention(B, T); }

void GPT2::run_blocks_forward(const AttentionParams& attn, int64_t N) {
  const int L = cfg_.n_layer;
  const float* x = a_.encoded;
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = 0; l < L; l++) {
      blocks_[l].forward(a_.out[size_t(l)], x, a_.blocks[size_t(l)], a_.scratch, attn, N);
      x = a_.out[size_t(l)];
    }
    return;
  }
  // every:K: block outputs go where they are kept (a segment's input, or the final output); the rest,
  // and the activations, use the segment buffers and are overwritten.
  const int K = a_.policy.k;
  for (int l = 0; l < L; l++) {
    float* y = l == L - 1 ? a_.final_out : ((l + 1) % K == 0 ? a_.ckpt_in[size_t((l + 1) / K)] : a_.out[size_t(l % K)]);
    blocks_[l].forward(y, x, a_.blocks[size_t(l % K)], a_.scratch, attn, N);
    x = y;
  }
}

void GPT2::lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum) {
  const int C = cfg_.n_embd, V = cfg_.vocab_size;
  for (int64_t r0 = 0; r0 < N; r0 += a_.chunk) {
    const int64_t rows = std::min(a_.chunk, N - r0);
    const float* x = a_.lnf_out + r0 * C;
    // Tied LM head: logits[rows, V] = lnf · wteᵀ
    const uint16_t* wte16 = lowp_ ? lowp_weights_.data() + (p_.wte - params_.f32()) : nullptr;
    void* scratch = lowp_scratch_.data();
    if (lowp_)
      cpu::gemm_lowp(*lowp_, false, true, rows, V, C, 1.0f, f32_operand(x, C), lowp_operand(wte16, C), 0.0f,
                     a_.logits, V, scratch);
    else
      cpu::gemm(false, true, rows, V, C, 1.0f, x, C, p_.wte, C, 0.0f, a_.logits, V);
    if (!targets) continue;
    cpu::softmax_crossentropy(a_.logits, a_.losses + r0, targets + r0, rows, V, V, grad_scale);
    if (grad_scale == 0.0f) continue;
    // logits now hold dlogits: dlnf = dlogits · wte ; dwte += dlogitsᵀ · lnf
    if (lowp_) {
      cpu::gemm_lowp(*lowp_, false, false, rows, C, V, 1.0f, f32_operand(a_.logits, V), lowp_operand(wte16, C), 0.0f,
                     a_.dlnf + r0 * C, C, scratch);
      cpu::gemm_lowp(*lowp_, true, false, V, C, rows, 1.0f, f32_operand(a_.logits, V), f32_operand(x, C), 1.0f,
                     g_.wte, C, scratch);
    } else {
      cpu::gemm(false, false, rows, C, V, 1.0f, a_.logits, V, p_.wte, C, 0.0f, a_.dlnf + r0 * C, C);
      cpu::gemm(true, false, V, C, rows, 1.0f, a_.logits, V, x, C, 1.0f, g_.wte, C);
    }
  }
  if (targets)
    for (int64_t i = 0; i < N; i++) *loss_sum += a_.losses[i];
}

double GPT2::forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                     float grad_scale) {
  const int64_t N = attn.cu_seqlens ? attn.cu_seqlens[attn.num_seqs] : int64_t(attn.B) * attn.T;
  KILN_CHECK(N <= a_.max_tokens, "batch of ", N, " tokens exceeds the planned ", a_.max_tokens, " (call plan first)");
  KILN_CHECK(grad_scale == 0.0f || grads_.data(), "training forward on a model built without gradients");
  const int C = cfg_.n_embd;
  last_N_ = N;
  last_attn_ = attn;
  cpu::embedding_forward(a_.encoded, tokens, pos, p_.wte, p_.wpe, N, C);
  run_blocks_forward(attn, N);
  lnf_.forward(a_.lnf_out, a_.lnf_mean, a_.lnf_rstd, a_.final_out, N);
  double sum = 0;
  lm_head(targets, grad_scale, N, &sum);
  return sum;
}

void GPT2::backward(const int32_t* tokens, const int32_t* pos) {
  KILN_CHECK(grads_.data(), "backward on a model built without gradients");
  const int64_t N = last_N_;
  const int C = cfg_.n_embd, L = cfg_.n_layer;
  std::memset(a_.dres, 0, size_t(N) * C * sizeof(float));
  lnf_.backward(a_.dres, a_.dlnf, a_.final_out, a_.lnf_mean, a_.lnf_rstd, N);
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = L - 1; l >= 0; l--) {
      const float* x = l ? a_.out[size_t(l - 1)] : a_.encoded;
      blocks_[l].backward(a_.dres, x, a_.blocks[size_t(l)], a_.scratch, last_attn_, N);
    }
  } else {
    const int K = a_.policy.k;
    for (int seg = (L - 1) / K; seg >= 0; seg--) {
      const int s = seg * K, e = std::min(L, s + K);
      // Recompute the segment's forward from its kept input, keeping every activation this time.
      const float* x = a_.ckpt_in[size_t(seg)];
      for (int l = s; l < e; l++) {
        float* y = l == e - 1 ? nullptr : a_.out[size_t(l - s)];  // the segment's output is not needed
        blocks_[l].forward(y, x, a_.blocks[size_t(l - s)], a_.scratch, last_attn_, N);
        x = y;
      }
      for (int l = e - 1; l >= s; l--) {
        const float* in = l == s ? a_.ckpt_in[size_t(seg)] : a_.out[size_t(l - s - 1)];
        blocks_[l].backward(a_.dres, in, a_.blocks[size_t(l - s)], a_.scratch, last_attn_, N);
      }
    }
  }
  cpu::embedding_backward(g_.wte, g_.wpe, a_.dres, tokens, pos, N, C);
}

void GPT2::zero_grad() {
  if (grads_.data()) std::memset(grads_.data(), 0, table_.total * sizeof(float));
}

}  // namespace kiln
