#include "models/gpt2_cuda_decoder.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/activation.h"
#include "kernels/argmax.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "models/family.h"

namespace kiln {

CudaDecoder::CudaDecoder(const ModelConfig& cfg, const float* params, int batch, int max_positions, bool use_graph)
    : model_cfg_(cfg), cfg_(GPT2Config::from(cfg, "--device cuda")), table_(model_param_table(cfg)), batch_(batch),
      use_graph_(use_graph) {
  cfg_.validate("decoder config");
  KILN_CHECK(gpu::initialized(), "CudaDecoder: the GPU is not initialised");
  KILN_CHECK(batch >= 1, "decoder: batch must be at least 1, got ", batch);
  const int C = cfg_.n_embd, NH = cfg_.n_head, HD = cfg_.head_dim(), V = cfg_.vocab_size;
  KILN_CHECK(HD == 64 || HD == 128, "--device cuda: the attention kernels support head dimensions 64 and 128; this "
             "model has n_embd / n_head = ", HD);
  KILN_CHECK(C % 8 == 0, "--device cuda: n_embd must be a multiple of 8 (got ", C, ")");
  max_pos_ = max_positions > 0 ? max_positions : cfg_.n_positions;
  KILN_CHECK(max_pos_ <= cfg_.n_positions, "decoder: max_positions ", max_pos_, " exceeds the model's n_positions ",
             cfg_.n_positions);

  const size_t n = table_.total;
  params_.resize(n * 4, "weights");
  params16_.resize(n * 2, "bf16 weights");
  gpu::copy_to_device(params_.data(), params, n * 4);
  cuda::cast(params16_.as<uint16_t>(), params_.as<float>(), int64_t(n), gpu::stream());
  p_ = GPT2Params::bind(table_, params_.as<float>(), cfg_.n_layer);
  const size_t cache = size_t(cfg_.n_layer) * size_t(batch) * size_t(max_pos_) * size_t(C);
  kcache_.resize(cache * 2, "KV cache (keys)");
  vcache_.resize(cache * 2, "KV cache (values)");

  rows_ = int64_t(batch) * kMaxChunk;
  const cuda::DecodeAttention worst = decode_params(kMaxDecodeQ, nullptr, nullptr);
  // The activations: measure, then allocate once.
  auto carve = [&](gpu::DeviceArena& a) {
    x_ = a.alloc<float>(size_t(rows_ * C));
    mean_ = a.alloc<float>(size_t(rows_));
    rstd_ = a.alloc<float>(size_t(rows_));
    lse_ = a.alloc<float>(size_t(NH * rows_));
    logits_ = a.alloc<float>(size_t(rows_ * V));
    ln_ = a.alloc<uint16_t>(size_t(rows_ * C));
    qkv_ = a.alloc<uint16_t>(size_t(rows_ * 3 * C));
    att_ = a.alloc<uint16_t>(size_t(rows_ * C));
    fc_pre_ = a.alloc<uint16_t>(size_t(rows_ * 4 * C));
    fc_ = a.alloc<uint16_t>(size_t(rows_ * 4 * C));
    // Tokens, positions and cache lengths side by side, so one copy per pass brings them over.
    tok_d_ = a.alloc<int32_t>(inputs_count());
    pos_d_ = tok_d_ ? tok_d_ + rows_ : nullptr;
    past_d_ = tok_d_ ? tok_d_ + 2 * rows_ : nullptr;
    argmax_d_ = a.alloc<int32_t>(size_t(batch));
    dec_scratch_ = a.alloc<char>(cuda::decode_attention_scratch_bytes(worst));
  };
  gpu::DeviceArena measure;
  carve(measure);
  acts_ = gpu::DeviceArena(measure.peak(), "decoder activations");
  carve(acts_);
  tok_h_ = static_cast<int32_t*>(gpu::malloc_host(inputs_count() * 4, "decoder input staging"));
  pos_h_ = tok_h_ + rows_;
  past_h_ = tok_h_ + 2 * rows_;
  argmax_h_ = static_cast<int32_t*>(gpu::malloc_host(size_t(batch) * 4, "decoder arg max staging"));
  logits_h_ = static_cast<float*>(gpu::malloc_host(size_t(rows_ * V) * 4, "decoder logits staging"));
  gpu::synchronize();
}

CudaDecoder::~CudaDecoder() {
  gpu::free_host(tok_h_);
  gpu::free_host(argmax_h_);
  gpu::free_host(logits_h_);
}

size_t CudaDecoder::device_bytes() const {
  return params_.size() + params16_.size() + kcache_.size() + vcache_.size() + acts_.capacity();
}

cuda::DecodeAttention CudaDecoder::decode_params(int Tq, const uint16_t* kc, const uint16_t* vc) const {
  const int C = cfg_.n_embd;
  cuda::DecodeAttention d;
  d.B = batch_;
  d.Tq = Tq;
  d.past_per_seq = past_d_;
  d.max_past = max_pos_;
  d.NH = cfg_.n_head;
  d.HD = cfg_.head_dim();
  d.scale = 1.0f / std::sqrt(float(d.HD));
  d.q = qkv_;
  d.q_stride = 3 * C;
  d.k = kc;
  d.v = vc;
  d.kv_batch_stride = int64_t(max_pos_) * C;
  d.kv_stride = C;
  d.out = att_;
  d.out_stride = C;
  return d;
}

const uint16_t* CudaDecoder::w16(const float* p) const {
  return params16_.as<uint16_t>() + (p - params_.as<float>());
}

void CudaDecoder::run(int n, bool flash, Output out, int limit) {
  void* s = gpu::stream();
  const int B = batch_, C = cfg_.n_embd, NH = cfg_.n_head, HD = cfg_.head_dim(), V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * n;
  const float eps = cfg_.layer_norm_epsilon;
  const int64_t kv_batch_stride = int64_t(max_pos_) * C;
  const int64_t layer_cache = int64_t(B) * kv_batch_stride;
  gpu::copy_to_device(tok_d_, tok_h_, inputs_count() * 4);
  cuda::embedding_forward(x_, tok_d_, pos_d_, p_.wte, p_.wpe, N, C, s);
  for (int l = 0; l < cfg_.n_layer; l++) {
    const LayerParams& w = p_.layers[size_t(l)];
    uint16_t* kc = kcache_.as<uint16_t>() + l * layer_cache;
    uint16_t* vc = vcache_.as<uint16_t>() + l * layer_cache;
    cuda::layernorm_forward(ln_, mean_, rstd_, x_, w.ln1_w, w.ln1_b, N, C, eps, s);
    cuda::matmul_forward_bf16_bias(qkv_, ln_, w16(w.qkv_w), w16(w.qkv_b), N, C, 3 * C, s);
    cuda::kv_cache_append(kc, vc, qkv_, past_d_, B, n, NH, NH, HD, kv_batch_stride, s);
    if (flash) {
      AttentionParams ap = cfg_.attention(B, n);
      cuda::attention_forward(att_, lse_, qkv_, ap, s);
    } else {
      cuda::decode_attention(decode_params(n, kc, vc), dec_scratch_, s);
    }
    cuda::matmul_forward_residual(x_, x_, att_, w16(w.attn_proj_w), w.attn_proj_b, N, C, C, s);
    cuda::layernorm_forward(ln_, mean_, rstd_, x_, w.ln2_w, w.ln2_b, N, C, eps, s);
    cuda::matmul_forward_bf16_bias(fc_, ln_, w16(w.fc_w), w16(w.fc_b), N, C, 4 * C, s, fc_pre_);
    cuda::matmul_forward_residual(x_, x_, fc_, w16(w.fc_proj_w), w.fc_proj_b, N, 4 * C, C, s);
  }
  // Final LayerNorm and the LM head over every row, or over each sequence's last row only.
  const uint16_t* wte16 = w16(p_.wte);
  if (out == Output::None) return;
  if (out == Output::All) {
    cuda::layernorm_forward(ln_, mean_, rstd_, x_, p_.lnf_w, p_.lnf_b, N, C, eps, s);
    cuda::gemm(false, true, N, V, C, 1.0f, ln_, C, wte16, C, 0.0f, logits_, V, s);
    gpu::copy_to_host_async(logits_h_, logits_, size_t(N) * size_t(V) * 4);
    return;
  }
  for (int b = 0; b < B; b++) {
    const float* last = x_ + (int64_t(b) * n + n - 1) * C;
    cuda::layernorm_forward(ln_ + int64_t(b) * C, mean_ + b, rstd_ + b, last, p_.lnf_w, p_.lnf_b, 1, C, eps, s);
  }
  cuda::gemm(false, true, B, V, C, 1.0f, ln_, C, wte16, C, 0.0f, logits_, V, s);
  if (out == Output::Argmax) {
    cuda::argmax_rows(argmax_d_, logits_, B, limit, V, s);
    gpu::copy_to_host_async(argmax_h_, argmax_d_, size_t(B) * 4);
  } else {
    gpu::copy_to_host_async(logits_h_, logits_, size_t(B) * size_t(V) * 4);
  }
}

const float* CudaDecoder::forward(const int32_t* tokens, int n, bool all_logits) {
  advance(tokens, n, all_logits ? Output::All : Output::Last, cfg_.vocab_size);
  return all_logits ? all_out_.data() : logits_h_;
}

const int32_t* CudaDecoder::forward_argmax(const int32_t* tokens, int n, int vocab_limit) {
  KILN_CHECK(vocab_limit >= 1 && vocab_limit <= cfg_.vocab_size, "decoder: arg max over ", vocab_limit,
             " ids of a ", cfg_.vocab_size, "-token vocabulary");
  advance(tokens, n, Output::Argmax, vocab_limit);
  return argmax_h_;
}

void CudaDecoder::advance(const int32_t* tokens, int n, Output out, int limit) {
  const int B = batch_, V = cfg_.vocab_size;
  KILN_CHECK(n >= 1, "decoder: no tokens to run");
  KILN_CHECK(length_ + n <= max_pos_, "decoder: ", length_, " cached + ", n, " new positions exceed the limit of ",
             max_pos_);
  for (int64_t i = 0; i < int64_t(B) * n; i++)
    KILN_CHECK(tokens[i] >= 0 && tokens[i] < V, "decoder: token ", tokens[i], " outside the vocabulary [0, ", V, ")");
  all_out_.clear();
  int done = 0;
  while (done < n) {
    // An empty cache takes FlashAttention over whole chunks; later positions go through decode attention.
    const bool flash = length_ == 0;
    const int chunk = std::min(n - done, flash ? kMaxChunk : kMaxDecodeQ);
    for (int b = 0; b < B; b++) {
      past_h_[b] = length_;
      for (int i = 0; i < chunk; i++) {
        tok_h_[b * chunk + i] = tokens[int64_t(b) * n + done + i];
        pos_h_[b * chunk + i] = length_ + i;
      }
    }
    // Only the last chunk's output is wanted, unless all positions' logits are.
    const Output chunk_out = out == Output::All || done + chunk == n ? out : Output::None;
    const bool step = chunk == 1 && !flash && (chunk_out == Output::Last || chunk_out == Output::Argmax) && use_graph_;
    StepGraph& g = step_graphs_[chunk_out == Output::Argmax ? 1 : 0];
    if (step && g.eager_runs >= 1) {
      // The decode step: captured once (after an eager run has set up cuBLASLt's plans), then replayed.
      if (!g.graph.ready() || g.limit != limit) {
        g.graph.begin();
        run(1, false, chunk_out, limit);
        g.graph.end();
        g.limit = limit;
      }
      g.graph.launch();
    } else {
      run(chunk, flash, chunk_out, limit);
      if (step) g.eager_runs++;
    }
    gpu::synchronize();
    if (out == Output::All) {
      // Gather [B, chunk, V] pieces into [B, n, V].
      all_out_.resize(size_t(B) * size_t(n) * size_t(V));
      for (int b = 0; b < B; b++)
        std::copy(logits_h_ + int64_t(b) * chunk * V, logits_h_ + int64_t(b + 1) * chunk * V,
                  all_out_.begin() + (int64_t(b) * n + done) * V);
    }
    length_ += chunk;
    done += chunk;
  }
}

}  // namespace kiln
