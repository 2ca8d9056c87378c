#include "models/gpt2_cuda.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/activation.h"
#include "kernels/crossentropy.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"

namespace kiln {

GPT2Cuda::GPT2Cuda(const GPT2Config& cfg, const ParamTable& table) : cfg_(cfg), table_(table) {
  KILN_CHECK(gpu::initialized(), "GPT2Cuda: the GPU is not initialised");
  const int HD = cfg.n_embd / cfg.n_head;
  KILN_CHECK(HD == 64 || HD == 128, "--device cuda: the attention kernels support head dimensions 64 and 128; this "
             "model has n_embd / n_head = ", HD);
  KILN_CHECK(cfg.n_embd % 8 == 0, "--device cuda: n_embd must be a multiple of 8 (got ", cfg.n_embd, ")");
  Vp_ = padded_vocab(cfg);
  const size_t n = table.total;
  params_.resize(n * 4, "parameters");
  params16_.resize(n * 2, "bf16 weight copy");
  grads_.resize(n * 4, "gradients");
  gpu::memset(grads_.data(), 0, n * 4);
  gpu::memset(params16_.data(), 0, n * 2);
  p_ = GPT2Params::bind(table, params_.as<float>(), cfg.n_layer);
  g_ = GPT2Params::bind(table, grads_.as<float>(), cfg.n_layer);
}

template <class T>
T* GPT2Cuda::at16(const float* p, T* base16) const {
  return base16 + (p - params_.as<float>());
}

void GPT2Cuda::upload_params(const float* host) {
  gpu::copy_to_device(params_.data(), host, table_.total * 4);
  cuda::cast(params16_.as<uint16_t>(), params_.as<float>(), int64_t(table_.total), gpu::stream());
  gpu::synchronize();
}
void GPT2Cuda::download_params(float* host) const { gpu::copy_to_host(host, params_.data(), table_.total * 4); }
void GPT2Cuda::download_grads(float* host) const { gpu::copy_to_host(host, grads_.data(), table_.total * 4); }

void GPT2Cuda::carve(const GPT2Config& cfg, int64_t Vp, gpu::DeviceArena& ar, int64_t N, bool recompute,
                     Acts& a_) {
  const int64_t C = cfg.n_embd, L = cfg.n_layer, NH = cfg.n_head;
  a_.x = ar.alloc<float>(size_t((L + 1) * N * C));
  // Every layer's activations, or one set that every layer shares when blocks are recomputed.
  a_.layers.assign(size_t(recompute ? 1 : L), Layer{});
  for (Layer& l : a_.layers) {
    l.ln1 = ar.alloc<uint16_t>(size_t(N * C));
    l.ln1_mean = ar.alloc<float>(size_t(N));
    l.ln1_rstd = ar.alloc<float>(size_t(N));
    l.qkv = ar.alloc<uint16_t>(size_t(N * 3 * C));
    l.att = ar.alloc<uint16_t>(size_t(N * C));
    l.lse = ar.alloc<float>(size_t(NH * N));
    l.mid = ar.alloc<float>(size_t(N * C));
    l.ln2 = ar.alloc<uint16_t>(size_t(N * C));
    l.ln2_mean = ar.alloc<float>(size_t(N));
    l.ln2_rstd = ar.alloc<float>(size_t(N));
    l.fc_pre = ar.alloc<uint16_t>(size_t(N * 4 * C));
    l.fc_gelu = ar.alloc<uint16_t>(size_t(N * 4 * C));
  }
  if (recompute) a_.layers.resize(size_t(L), a_.layers[0]);
  a_.lnf = ar.alloc<uint16_t>(size_t(N * C));
  a_.lnf_mean = ar.alloc<float>(size_t(N));
  a_.lnf_rstd = ar.alloc<float>(size_t(N));
  a_.logits = ar.alloc<uint16_t>(size_t(N * Vp));
  a_.losses = ar.alloc<float>(size_t(N));
  a_.dres = ar.alloc<float>(size_t(N * C));
  a_.dres16 = ar.alloc<uint16_t>(size_t(N * C));
  a_.d_big = ar.alloc<uint16_t>(size_t(N * 4 * C));
  a_.d_qkv = ar.alloc<uint16_t>(size_t(N * 3 * C));
  a_.d_c = ar.alloc<uint16_t>(size_t(N * C));
  a_.ln_scratch = ar.alloc<float>(cuda::layernorm_backward_scratch_floats(N, int(C)));
  a_.emb_scratch = ar.alloc<char>(cuda::embedding_backward_scratch_bytes(N));
  // The attention backward's scratch for the largest batch shape: N tokens in one sequence bounds every split.
  AttentionParams worst = cfg.attention(1, int(N));
  a_.att_scratch = ar.alloc<char>(cuda::attention_backward_scratch_bytes(worst));
  a_.tokens = ar.alloc<int32_t>(size_t(N));
  a_.targets = ar.alloc<int32_t>(size_t(N));
  a_.pos = ar.alloc<int32_t>(size_t(N));
  a_.cu_seqlens = ar.alloc<int32_t>(size_t(N + 1));
}

size_t GPT2Cuda::plan_bytes(const GPT2Config& cfg, int64_t max_tokens, bool recompute_blocks) {
  gpu::DeviceArena measure;
  Acts a;
  carve(cfg, padded_vocab(cfg), measure, max_tokens, recompute_blocks, a);
  return measure.peak();
}

size_t GPT2Cuda::plan(int64_t max_tokens, bool recompute_blocks) {
  KILN_CHECK(max_tokens > 0, "GPT2Cuda::plan: no tokens");
  arena_ = gpu::DeviceArena(plan_bytes(cfg_, max_tokens, recompute_blocks), "activations");
  carve(cfg_, Vp_, arena_, max_tokens, recompute_blocks, a_);
  recompute_ = recompute_blocks;
  max_tokens_ = max_tokens;
  return arena_.capacity();
}

double GPT2Cuda::forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, int64_t N,
                         const AttentionParams& attn, float grad_scale) {
  KILN_CHECK(N > 0 && N <= max_tokens_, "GPT2Cuda::forward: ", N, " tokens, planned for ", max_tokens_);
  void* s = gpu::stream();
  const int C = cfg_.n_embd, V = cfg_.vocab_size;
  uint16_t* w16 = params16_.as<uint16_t>();
  gpu::copy_to_device(a_.tokens, tokens, size_t(N) * 4);
  gpu::copy_to_device(a_.pos, pos, size_t(N) * 4);
  std::vector<int32_t> no_targets;
  if (!targets) {
    no_targets.assign(size_t(N), -1);
    targets = no_targets.data();
  }
  gpu::copy_to_device(a_.targets, targets, size_t(N) * 4);
  ap_ = attn;
  if (attn.cu_seqlens) {
    int64_t total = 0;
    std::vector<AttentionSpan> spans = attention_spans(attn, total);
    KILN_CHECK(total == N, "GPT2Cuda::forward: cu_seqlens covers ", total, " tokens, the batch has ", N);
    int max_len = 0;
    for (const AttentionSpan& sp : spans) max_len = std::max(max_len, int(sp.len));
    gpu::copy_to_device(a_.cu_seqlens, attn.cu_seqlens, size_t(attn.num_seqs + 1) * 4);
    ap_.cu_seqlens = a_.cu_seqlens;
    ap_.max_seqlen = max_len;
    ap_.total_tokens = N;
  } else {
    KILN_CHECK(int64_t(attn.B) * attn.T == N, "GPT2Cuda::forward: B·T = ", int64_t(attn.B) * attn.T, ", N = ", N);
  }
  N_ = N;

  cuda::embedding_forward(a_.x, a_.tokens, a_.pos, p_.wte, p_.wpe, N, C, s);
  for (int l = 0; l < cfg_.n_layer; l++) block_forward(l, /*write_output=*/true);
  float* xL = a_.x + size_t(cfg_.n_layer) * size_t(N) * size_t(C);
  cuda::layernorm_forward(a_.lnf, a_.lnf_mean, a_.lnf_rstd, xL, p_.lnf_w, p_.lnf_b, N, C, cfg_.layer_norm_epsilon, s);
  // Tied LM head: logits[N, V] = lnf[N, C] · wte[V, C]^T.
  cuda::gemm(false, true, N, V, C, 1.0f, a_.lnf, C, at16(p_.wte, w16), C, 0.0f, a_.logits, Vp_, s);
  cuda::softmax_crossentropy(a_.logits, a_.losses, a_.targets, N, V, Vp_, grad_scale, s);
  std::vector<float> losses(static_cast<size_t>(N));
  gpu::copy_to_host(losses.data(), a_.losses, size_t(N) * 4);
  double sum = 0;
  for (float v : losses) sum += double(v);
  return sum;
}

void GPT2Cuda::block_forward(int l, bool write_output) {
  void* s = gpu::stream();
  const int64_t N = N_;
  const int C = cfg_.n_embd;
  const float eps = cfg_.layer_norm_epsilon;
  uint16_t* w16 = params16_.as<uint16_t>();
  const LayerParams& w = p_.layers[size_t(l)];
  Layer& a = a_.layers[size_t(l)];
  float* x = a_.x + size_t(l) * size_t(N) * size_t(C);
  cuda::layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, w.ln1_w, w.ln1_b, N, C, eps, s);
  cuda::matmul_forward_bf16_bias(a.qkv, a.ln1, at16(w.qkv_w, w16), at16(w.qkv_b, w16), N, C, 3 * C, s);
  cuda::attention_forward(a.att, a.lse, a.qkv, ap_, s);
  cuda::matmul_forward_residual(a.mid, x, a.att, at16(w.attn_proj_w, w16), w.attn_proj_b, N, C, C, s);
  cuda::layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.mid, w.ln2_w, w.ln2_b, N, C, eps, s);
  cuda::matmul_forward_bf16_bias(a.fc_gelu, a.ln2, at16(w.fc_w, w16), at16(w.fc_b, w16), N, C, 4 * C, s, a.fc_pre);
  if (write_output)
    cuda::matmul_forward_residual(x + size_t(N) * size_t(C), a.mid, a.fc_gelu, at16(w.fc_proj_w, w16), w.fc_proj_b, N,
                                  4 * C, C, s);
}

void GPT2Cuda::backward() {
  KILN_CHECK(N_ > 0, "GPT2Cuda::backward without a forward");
  void* s = gpu::stream();
  const int64_t N = N_;
  const int C = cfg_.n_embd, V = cfg_.vocab_size;
  uint16_t* w16 = params16_.as<uint16_t>();
  // LM head: d lnf = dlogits · wte; dwte += dlogits^T · lnf.
  cuda::gemm(false, false, N, C, V, 1.0f, a_.logits, Vp_, at16(p_.wte, w16), C, 0.0f, a_.d_c, C, s);
  cuda::gemm(true, false, V, C, N, 1.0f, a_.logits, Vp_, a_.lnf, C, 1.0f, g_.wte, C, s);
  float* xL = a_.x + size_t(cfg_.n_layer) * size_t(N) * size_t(C);
  gpu::memset(a_.dres, 0, size_t(N) * size_t(C) * 4);
  cuda::layernorm_backward(a_.dres, g_.lnf_w, g_.lnf_b, a_.d_c, xL, p_.lnf_w, a_.lnf_mean, a_.lnf_rstd, N, C,
                           a_.ln_scratch, s);
  for (int l = cfg_.n_layer - 1; l >= 0; l--) {
    const LayerParams& w = p_.layers[size_t(l)];
    const LayerParams& g = g_.layers[size_t(l)];
    Layer& a = a_.layers[size_t(l)];
    const float* x = a_.x + size_t(l) * size_t(N) * size_t(C);
    if (recompute_) block_forward(l, /*write_output=*/false);  // the shared activations now hold block l's
    // MLP: x_next = mid + fc_proj(gelu(fc(ln2(mid)))).
    cuda::cast(a_.dres16, a_.dres, N * C, s);
    cuda::matmul_backward(a_.d_big, g.fc_proj_w, g.fc_proj_b, a_.dres16, a.fc_gelu, at16(w.fc_proj_w, w16), N, 4 * C,
                          C, s);
    cuda::gelu_backward(a_.d_big, a.fc_pre, a_.d_big, N * 4 * C, s);
    cuda::matmul_backward(a_.d_c, g.fc_w, g.fc_b, a_.d_big, a.ln2, at16(w.fc_w, w16), N, C, 4 * C, s);
    cuda::layernorm_backward(a_.dres, g.ln2_w, g.ln2_b, a_.d_c, a.mid, w.ln2_w, a.ln2_mean, a.ln2_rstd, N, C,
                             a_.ln_scratch, s);
    // Attention: mid = x + proj(attention(qkv(ln1(x)))).
    cuda::cast(a_.dres16, a_.dres, N * C, s);
    cuda::matmul_backward(a_.d_c, g.attn_proj_w, g.attn_proj_b, a_.dres16, a.att, at16(w.attn_proj_w, w16), N, C, C,
                          s);
    cuda::attention_backward(a_.d_qkv, a_.d_c, a.qkv, a.att, a.lse, ap_, a_.att_scratch, s);
    cuda::matmul_backward(a_.d_c, g.qkv_w, g.qkv_b, a_.d_qkv, a.ln1, at16(w.qkv_w, w16), N, C, 3 * C, s);
    cuda::layernorm_backward(a_.dres, g.ln1_w, g.ln1_b, a_.d_c, x, w.ln1_w, a.ln1_mean, a.ln1_rstd, N, C,
                             a_.ln_scratch, s);
  }
  cuda::embedding_backward(g_.wte, g_.wpe, a_.dres, a_.tokens, a_.pos, N, C, a_.emb_scratch, s);
  gpu::check("GPT-2 backward");
}

void GPT2Cuda::zero_grad() { gpu::memset(grads_.data(), 0, table_.total * 4); }

}  // namespace kiln
