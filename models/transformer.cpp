#include "models/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/gpu.h"
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

nn::BlockShape block_shape(const ModelConfig& c, int layer) {
  nn::BlockShape S = block_shape_all(c);
  // A layer has one feed-forward: the mixture of experts or the dense one.
  if (c.is_moe_layer(layer))
    S.ffn.F = 0;
  else
    S.moe = nn::MoEShape{};
  return S;
}

nn::BlockShape block_shape_all(const ModelConfig& c) {
  nn::BlockShape S;
  nn::AttentionShape& A = S.attn;
  A.C = c.d_model;
  A.NH = c.n_head;
  A.NKV = c.n_kv_head;
  A.HD = c.head_dim;
  A.qk_norm = c.qk_norm;
  A.qk_eps = c.norm_eps;
  A.rotary = c.positions == PositionKind::Rotary;
  A.rot_dim = c.head_dim;
  nn::FFNShape& F = S.ffn;
  F.C = c.d_model;
  F.F = c.d_ff;
  F.gated = c.gated_ffn;
  F.act = c.activation;
  if (c.mla.on()) {
    nn::MLAShape& M = S.mla;
    M.C = c.d_model;
    M.NH = c.n_head;
    M.q_lora = c.mla.q_lora_rank;
    M.r = c.mla.kv_lora_rank;
    M.nope = c.mla.qk_nope_dim;
    M.rope = c.mla.qk_rope_dim;
    M.vd = c.mla.v_head_dim;
    M.eps = 1e-6f;  // Hugging Face's q_a/kv_a_layernorm keep DeepseekV3RMSNorm's default, not rms_norm_eps
    M.interleaved = c.mla.rope_interleave;
  }
  if (!c.has_dense_ffn()) F.F = 0;
  if (c.has_moe()) {
    nn::MoEShape& M = S.moe;
    M.C = c.d_model;
    M.F = c.moe_d_ff;
    M.shared_F = c.n_shared_experts * c.moe_d_ff;
    MoeRouting& r = M.routing;
    r.E = c.n_experts;
    r.K = c.moe_top_k;
    r.groups = c.moe_groups;
    r.topk_groups = c.moe_topk_groups;
    r.sigmoid = c.moe_scoring == RouterScoring::Sigmoid;
    r.norm_topk = c.norm_topk_prob;
    r.scale = float(c.routed_scaling_factor);
  }
  return S;
}

void TransformerWeights::bind(const ModelConfig& c, const ParamTable& t, const float* params, float* grads,
                              const uint16_t* params16, const float* inv_freq) {
  bind(c, t, [&](size_t off) {
    return TensorHome{params + off, grads ? grads + off : nullptr, params16 ? params16 + off : nullptr};
  }, inv_freq);
}

void TransformerWeights::bind(const ModelConfig& c, const ParamTable& t, const LocateTensor& locate,
                              const float* inv_freq) {
  auto p = [&](const std::string& key) -> const float* {
    const ParamSpec* s = t.find_key(key);
    return s ? locate(s->offset).p : nullptr;
  };
  auto g = [&](const std::string& key) -> float* {
    const ParamSpec* s = t.find_key(key);
    return s ? locate(s->offset).g : nullptr;
  };
  auto p16 = [&](const std::string& key) -> const uint16_t* {
    const ParamSpec* s = t.find_key(key);
    return s ? locate(s->offset).p16 : nullptr;
  };
  auto weight = [&](const std::string& w, const std::string& b, int in, int out) {
    nn::Weight x;
    x.w = locate(t.get_key(w).offset).p;
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
  blocks.assign(size_t(c.n_layer), nn::Block{});
  mtp.assign(size_t(c.mtp_depth), nn::MTPModule{});
  for (int l = 0; l < c.n_layer + c.mtp_depth; l++) {
    const std::string b = "blk." + std::to_string(l) + ".";
    if (l >= c.n_layer) {
      nn::MTPModule& m = mtp[size_t(l - c.n_layer)];
      m.enorm = norm(b + "nextn.enorm");
      m.hnorm = norm(b + "nextn.hnorm");
      m.head_norm = norm(b + "nextn.shared_head_norm");
      m.eh_proj = weight(b + "nextn.eh_proj.weight", "", 2 * c.d_model, c.d_model);
    }
    nn::Block& k = l < c.n_layer ? blocks[size_t(l)] : mtp[size_t(l - c.n_layer)].block;
    const nn::BlockShape S = block_shape(c, l);
    k.shape = S;
    k.norm1 = norm(b + "attn_norm");
    k.norm2 = norm(b + "ffn_norm");
    if (S.moe) {
      nn::MoE& m = k.moe;
      m.shape = S.moe;
      m.router = weight(b + "ffn_gate_inp.weight", "", c.d_model, c.n_experts);
      m.router.w16 = nullptr;  // routing is decided in fp32
      m.bias = p(b + "exp_probs_b.bias");
      m.gate = p(b + "ffn_gate_exps.weight");
      m.up = p(b + "ffn_up_exps.weight");
      m.down = p(b + "ffn_down_exps.weight");
      KILN_CHECK(m.gate && m.up && m.down, "parameter table: layer ", l, " lacks its experts");
      m.dgate = g(b + "ffn_gate_exps.weight");
      m.dup = g(b + "ffn_up_exps.weight");
      m.ddown = g(b + "ffn_down_exps.weight");
      if (S.moe.shared_F) {
        m.shared.shape = S.moe.shared();
        m.shared.up = weight(b + "ffn_gate_shexp.weight", "", c.d_model, 2 * S.moe.shared_F);
        m.shared.down = weight(b + "ffn_down_shexp.weight", "", S.moe.shared_F, c.d_model);
      }
    } else {
      const std::string up = c.gated_ffn ? "ffn_gate" : "ffn_up";  // gate and up packed: [gate | up] rows
      k.ffn.shape = S.ffn;
      k.ffn.up = weight(b + up + ".weight", c.ffn_bias ? b + up + ".bias" : "", c.d_model, S.ffn.up());
      k.ffn.down = weight(b + "ffn_down.weight", c.ffn_bias ? b + "ffn_down.bias" : "", c.d_ff, c.d_model);
    }
    if (S.mla.on()) {
      // Latent attention: [q (or q_a) | kv_a_mqa] packed into one product.
      const nn::MLAShape& M = S.mla;
      nn::LatentAttention& m = k.mla;
      m.shape = M;
      m.a = weight(b + (M.q_lora ? "attn_q_a" : "attn_q") + ".weight", "", c.d_model, M.a());
      if (M.q_lora) {
        m.q_b = weight(b + "attn_q_b.weight", "", M.q_lora, M.NH * M.qk());
        m.q_norm = p(b + "attn_q_a_norm.weight");
        m.dq_norm = g(b + "attn_q_a_norm.weight");
      }
      m.kv_b = weight(b + "attn_kv_b.weight", "", M.r, M.kv());
      m.kv_norm = p(b + "attn_kv_a_norm.weight");
      m.dkv_norm = g(b + "attn_kv_a_norm.weight");
      m.proj = weight(b + "attn_output.weight", "", M.att(), c.d_model);
      const float f = c.rope_attention_factor();
      m.q_rope = RopeParams{M.NH, M.qk(), M.rope, M.qkv(), inv_freq, M.interleaved, f};
      m.k_rope = RopeParams{1, M.rope, M.rope, M.a(), inv_freq, M.interleaved, f};
      continue;
    }
    // q, k, v are one matrix: GPT-2's fused c_attn, or the packed q/k/v projections.
    const std::string qkv = c.layout == WeightLayout::InOut ? "attn_qkv" : "attn_q";
    nn::Attention& at = k.attn;
    at.shape = S.attn;
    at.qkv = weight(b + qkv + ".weight", c.qkv_bias ? b + qkv + ".bias" : "", c.d_model, c.qkv_dim());
    at.proj = weight(b + "attn_output.weight", c.attn_out_bias ? b + "attn_output.bias" : "", c.q_dim(), c.d_model);
    if (c.qk_norm) {
      at.q_norm = p(b + "attn_q_norm.weight");
      at.k_norm = p(b + "attn_k_norm.weight");
      at.dq_norm = g(b + "attn_q_norm.weight");
      at.dk_norm = g(b + "attn_k_norm.weight");
    }
    const nn::AttentionShape& A = S.attn;
    at.rope = RopeParams{A.NH + A.NKV, A.HD, A.rot_dim, A.qkv(), inv_freq};
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

AttentionParams Model::attention(int B, int T) const { return attention_params(config(), B, T); }

AttentionParams attention_params(const ModelConfig& c, int B, int T) {
  AttentionParams ap;
  ap.B = B;
  ap.T = T;
  ap.NH = c.n_head;
  ap.NKV = c.n_kv_head;
  ap.HD = c.head_dim;
  ap.window = c.sliding_window;
  if (c.mla.on()) ap.HDv = c.mla.v_head_dim;  // heads of nope + rope for q and k, v_head_dim for v
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
    const float std = (ends_with(s.key, "attn_output.weight") || ends_with(s.key, "ffn_down.weight") ||
                       ends_with(s.key, "ffn_down_exps.weight") || ends_with(s.key, "ffn_down_shexp.weight"))
                          ? std_resid
                          : 0.02f;
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

void IncrementalDecoder::truncate(int length) {
  KILN_CHECK(false, "decoder: this decoder cannot roll its cache back to ", length, " positions");
}

const float* IncrementalDecoder::self_draft(int, int32_t) {
  KILN_CHECK(false, "decoder: this model has no multi-token-prediction modules to draft with");
  return nullptr;
}

void TransformerDecoder::truncate(int length) {
  KILN_CHECK(length >= 0 && length <= length_, "decoder: truncate to ", length, " positions of a cache holding ",
             length_);
  length_ = length;
  mtp_forget(length);  // the MTP modules' caches roll back with the main one
}

const float* IncrementalDecoder::hidden() const { fail("decoder: this decoder does not expose hidden states"); }
const float* IncrementalDecoder::forward_tree(const int32_t*, int, const int32_t*, const uint64_t*) {
  fail("decoder: this decoder has no tree attention");
}
void IncrementalDecoder::keep_path(int, const int32_t*, int) { fail("decoder: this decoder has no tree attention"); }

// ---- training ----

namespace {

std::unique_ptr<nn::Backend> make_backend(bool cuda, std::optional<LowpType> lowp) {
  if (!cuda) return nn::make_cpu_backend(lowp);
  KILN_CHECK(gpu::initialized(), "--device cuda: the GPU is not initialised");
  KILN_CHECK(!lowp || *lowp == LowpType::BF16, "--device cuda trains in bf16");
  return nn::make_cuda_backend();
}

// The GPU kernels' shape limits, checked once with the model (one line naming the config field).
void check_device_shapes(const ModelConfig& c) {
  if (c.mla.on()) {
    KILN_CHECK(cuda_attention_dims(c.mla.qk_dim(), c.mla.v_head_dim), "--device cuda: the attention kernels take "
               "latent attention's qk_nope_head_dim + qk_rope_head_dim / v_head_dim of ", kCudaAttentionDims,
               "; this model has ", c.mla.qk_dim(), "/", c.mla.v_head_dim);
  } else {
    KILN_CHECK(c.head_dim == 64 || c.head_dim == 128, "--device cuda: the attention kernels support head_dim 64 and "
               "128; this model has head_dim ", c.head_dim);
  }
  KILN_CHECK(c.d_model % 8 == 0, "--device cuda: d_model must be a multiple of 8 (got ", c.d_model, ")");
}

// Converts the matrices (not the learned positions, which no product reads) into the 16-bit copy.
void refresh_lowp(nn::Backend& be, const ParamTable& t, uint16_t* params16, const float* params) {
  if (!params16) return;
  for (const ParamSpec& s : t.specs)
    if (s.shape.ndim == 2 && s.key != "position_embd.weight")
      be.to_lowp(params16 + s.offset, params + s.offset, s.numel(), *be.lowp());
}

int64_t padded_logits_ld(int V, bool device) { return device ? (int64_t(V) + 63) / 64 * 64 : V; }

}  // namespace

std::unique_ptr<nn::Backend> make_backend_for(const ModelConfig& cfg, bool cuda, std::optional<LowpType> lowp) {
  std::unique_ptr<nn::Backend> be = make_backend(cuda, lowp);
  if (cuda) check_device_shapes(cfg);
  return be;
}

namespace {

// Some of the table's tensors packed into a smaller block: tensors adjacent in the table (packed ones read across
// their neighbours: q|k|v, gate|up) stay adjacent, and each keeps its offset modulo 16 floats (the table's
// alignment).
struct CompactTable {
  std::vector<std::pair<size_t, size_t>> kept;  // stretches [begin, end) of the table
  std::vector<size_t> at;                       // where each begins in the block
  size_t total = 0;
  CompactTable(const ParamTable& t, const std::function<bool(const ParamSpec&)>& keep) {
    std::vector<const ParamSpec*> order;
    for (const ParamSpec& s : t.specs) order.push_back(&s);
    std::sort(order.begin(), order.end(), [](const ParamSpec* a, const ParamSpec* b) { return a->offset < b->offset; });
    for (const ParamSpec* s : order) {
      if (!keep(*s)) continue;
      const size_t b = s->offset, e = b + size_t(s->numel());
      if (!kept.empty() && kept.back().second == b) {
        kept.back().second = e;
      } else {
        kept.push_back({b, e});
        at.push_back((total + 15) / 16 * 16 + b % 16);
      }
      total = at.back() + (e - kept.back().first);
    }
  }
  // The block offset of table offset `off`, or SIZE_MAX where it is not kept.
  size_t find(size_t off) const {
    for (size_t i = 0; i < kept.size(); i++)
      if (off >= kept[i].first && off < kept[i].second) return at[i] + (off - kept[i].first);
    return SIZE_MAX;
  }
};

}  // namespace

void DecoderWeights::load(nn::Backend& be, const ModelConfig& cfg, const ParamTable& t, const float* host,
                          TransformerWeights& w, WeightFormat f) {
  const std::vector<float> freqs = cfg.rope_inv_freq();
  inv_freq = nn::DeviceBlock(be, freqs.size() * sizeof(float), "rotary frequencies");
  if (!freqs.empty()) be.upload(inv_freq.data(), freqs.data(), freqs.size() * sizeof(float));
  if (be.on_host()) {
    w.bind(cfg, t, host, nullptr, nullptr, inv_freq.as<float>());
    narrow.convert(w, f);
    return;
  }
  // bf16 is what the device's own products read (tensor cores, bf16 copies of every matrix): no narrow copy.
  if (f == WeightFormat::BF16) f = WeightFormat::F32;
  if (f == WeightFormat::F32) {
    const size_t n = t.total;
    params = nn::DeviceBlock(be, n * sizeof(float), "weights");
    be.upload(params.data(), host, n * sizeof(float));
    const float* dev = params.as<float>();
    params16 = nn::DeviceBlock(be, n * sizeof(uint16_t), "16-bit weights");
    uint16_t* p16 = params16.as<uint16_t>();
    be.memset(p16, 0, n * sizeof(uint16_t));
    refresh_lowp(be, t, p16, dev);
    w.bind(cfg, t, dev, nullptr, p16, inv_freq.as<float>());
    return;
  }
  // Narrow on a device: the copies are made from the host block, and the device gets the rest.
  TransformerWeights hw;
  hw.bind(cfg, t, host, nullptr, nullptr, inv_freq.as<float>());
  narrow.convert(hw, f);
  const ParamSpec* embd = t.find_key("token_embd.weight");
  std::vector<std::pair<size_t, size_t>> narrow_only;  // the converted matrices' floats
  for (const nn::Weight* x : NarrowWeights::matrices(hw))
    if (!embd || x->w != host + embd->offset)  // a tied head's embedding stays: the lookup reads it
      narrow_only.push_back({size_t(x->w - host), size_t(x->w - host) + size_t(x->in) * size_t(x->out)});
  auto fp32 = [&](const ParamSpec& s) {
    for (const auto& [b, e] : narrow_only)
      if (s.offset >= b && s.offset < e) return false;
    return true;
  };
  // bf16: the matrices the device's own products still read (refresh_lowp's rule; the embeddings are read in
  // fp32 only, a head being narrow).
  auto bf16 = [&](const ParamSpec& s) {
    return fp32(s) && s.shape.ndim == 2 && s.key != "token_embd.weight" && s.key != "position_embd.weight";
  };
  const CompactTable c32(t, fp32), c16(t, bf16);
  std::vector<float> staged(c32.total, 0.0f);
  for (size_t i = 0; i < c32.kept.size(); i++)
    std::copy(host + c32.kept[i].first, host + c32.kept[i].second, staged.begin() + ptrdiff_t(c32.at[i]));
  params = nn::DeviceBlock(be, staged.size() * sizeof(float), "weights");
  be.upload(params.data(), staged.data(), staged.size() * sizeof(float));
  const float* dev = params.as<float>();
  params16 = nn::DeviceBlock(be, c16.total * sizeof(uint16_t), "16-bit weights");
  uint16_t* p16 = params16.as<uint16_t>();
  be.memset(p16, 0, c16.total * sizeof(uint16_t));
  for (const ParamSpec& s : t.specs) {
    const size_t a = c32.find(s.offset), b = c16.find(s.offset);
    if (s.shape.ndim == 2 && b != SIZE_MAX) be.to_lowp(p16 + b, dev + a, s.numel(), *be.lowp());
  }
  w.bind(cfg, t, [&](size_t off) {
    const size_t a = c32.find(off), b = c16.find(off);
    return TensorHome{a == SIZE_MAX ? nullptr : dev + a, nullptr, b == SIZE_MAX ? nullptr : p16 + b};
  }, inv_freq.as<float>());
  narrow.upload(be, w);
}

nn::OpScratch training_scratch(const ModelConfig& cfg, int64_t N) {
  nn::OpScratch s;
  s.rows = N;
  s.C = cfg.d_model;
  if (cfg.qk_norm) s.head_groups = N * std::max(cfg.n_head, cfg.n_kv_head);
  s.HD = cfg.head_dim;
  if (cfg.mla.on()) {  // latent attention's norms of q_a and c_KV: one group per row
    s.head_groups = std::max(s.head_groups, N);
    s.HD = std::max({s.HD, cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank});
  }
  // One sequence of N tokens bounds the attention backward's scratch for every split of N.
  s.attention.B = 1;
  s.attention.T = int(N);
  s.attention.NH = cfg.n_head;
  s.attention.NKV = cfg.n_kv_head;
  s.attention.HD = cfg.head_dim;
  if (cfg.mla.on()) s.attention.HDv = cfg.mla.v_head_dim;
  s.attention.scale = cfg.attention_scale();
  s.decode.B = 0;
  return s;
}

Transformer::Transformer(const ModelConfig& cfg, const ModelOptions& opt)
    : cfg_(cfg), table_(model_param_table(cfg)), be_(make_backend(opt.cuda, opt.lowp)), mtp_lambda_(opt.mtp_lambda) {
  cfg_.validate("model config");
  KILN_CHECK(opt.mtp_lambda >= 0, "--mtp-lambda must be >= 0 (got ", opt.mtp_lambda, ")");
  if (opt.cuda) check_device_shapes(cfg_);
  const size_t n = table_.total;
  const std::vector<float> inv_freq = cfg_.rope_inv_freq();
  inv_freq_buf_ = nn::DeviceBlock(*be_, inv_freq.size() * sizeof(float), "rotary frequencies");
  if (!inv_freq.empty()) be_->upload(inv_freq_buf_.data(), inv_freq.data(), inv_freq.size() * sizeof(float));
  if (opt.shard.stage >= 2) {
    KILN_CHECK(opt.with_grads, "sharded storage (ZeRO ", opt.shard.stage, ") is for training models");
    shard_setup(opt);  // models/transformer_shard.cpp
  } else {
    params_buf_ = nn::DeviceBlock(*be_, n * sizeof(float), "parameters");
    params_ = params_buf_.as<float>();
    be_->memset(params_, 0, n * sizeof(float));
    if (opt.with_grads) {
      grads_buf_ = nn::DeviceBlock(*be_, n * sizeof(float), "gradients");
      grads_ = grads_buf_.as<float>();
      be_->memset(grads_, 0, n * sizeof(float));
    }
    if (be_->lowp()) {
      params16_buf_ = nn::DeviceBlock(*be_, n * sizeof(uint16_t), "16-bit weight copy");
      params16_ = params16_buf_.as<uint16_t>();
      be_->memset(params16_, 0, n * sizeof(uint16_t));
    }
    w_.bind(cfg_, table_, params_, grads_, params16_, inv_freq_buf_.as<float>());
  }
  if (shard_.stage < 3) {
    if (be_->on_host()) {
      host_ = params_;
    } else {
      host_buf_.resize(n * sizeof(float));
      host_ = host_buf_.f32();
    }
  }
  // The MTP modules' blocks (layers n_layer ..) count and balance like the main ones.
  for (int l = 0; l < cfg_.n_layer + cfg_.mtp_depth; l++)
    if (cfg_.is_moe_layer(l)) moe_layers_.push_back(l);
  if (!moe_layers_.empty()) {
    const size_t bytes = moe_layers_.size() * size_t(cfg_.n_experts) * sizeof(float);
    load_buf_ = nn::DeviceBlock(*be_, bytes, "expert load");
    be_->memset(load_buf_.data(), 0, bytes);
  }
}

Transformer::~Transformer() = default;

void Transformer::count_load(int layer, const nn::BlockActivations& a) {
  if (!counting_ || !cfg_.is_moe_layer(layer)) return;
  aux_sum_ += a.moe.aux_loss;
  const size_t j = size_t(std::find(moe_layers_.begin(), moe_layers_.end(), layer) - moe_layers_.begin());
  be_->moe_count(load_buf_.as<float>() + j * size_t(cfg_.n_experts), a.moe.offsets, cfg_.n_experts);
}

std::vector<std::vector<float>> Transformer::take_expert_load() {
  if (moe_layers_.empty()) return {};
  const size_t E = size_t(cfg_.n_experts);
  std::vector<float> all(moe_layers_.size() * E);
  be_->download(all.data(), load_buf_.data(), all.size() * sizeof(float));
  be_->memset(load_buf_.data(), 0, all.size() * sizeof(float));
  std::vector<std::vector<float>> out;
  for (size_t j = 0; j < moe_layers_.size(); j++) out.emplace_back(all.begin() + j * E, all.begin() + (j + 1) * E);
  return out;
}

void Transformer::update_expert_bias(const std::vector<std::vector<float>>& load, float gamma) {
  if (gamma == 0.0f) return;
  KILN_CHECK(load.size() == moe_layers_.size(), "expert bias update: load of ", load.size(), " layers for ",
             moe_layers_.size(), " MoE layers");
  const int E = cfg_.n_experts;
  for (size_t j = 0; j < moe_layers_.size(); j++) {
    const ParamSpec* s = table_.find_key("blk." + std::to_string(moe_layers_[j]) + ".exp_probs_b.bias");
    if (!s) continue;  // a router without a selection bias (Qwen3-MoE)
    KILN_CHECK(int(load[j].size()) == E, "expert bias update: load of ", load[j].size(), " experts, the model has ", E);
    if (shard_.stage >= 3) {
      // Only this rank's segment of the bias is kept (the update is elementwise): moved there alone.
      const size_t a = std::max(s->offset, shard_.begin), e = std::min(s->offset + size_t(E), shard_.end);
      if (a >= e) continue;
      std::vector<float> bias(size_t(E), 0.0f);
      float* dev = pshard_buf_.as<float>() + (a - shard_.begin);
      be_->download(bias.data() + (a - s->offset), dev, (e - a) * sizeof(float));
      nn::moe_bias_update(bias.data(), load[j].data(), E, gamma);
      be_->upload(dev, bias.data() + (a - s->offset), (e - a) * sizeof(float));
      continue;
    }
    // The bias lives on the backend; the host mirror follows (on the CPU they are one array).
    float* dev = params_ + s->offset;
    float* host = host_ + s->offset;
    if (!be_->on_host()) be_->download(host, dev, size_t(E) * sizeof(float));
    nn::moe_bias_update(host, load[j].data(), E, gamma);
    if (!be_->on_host()) be_->upload(dev, host, size_t(E) * sizeof(float));
  }
}

float* Transformer::host_params() {
  if (shard_.stage >= 3 && !host_) {
    host_buf_.resize(table_.total * sizeof(float));
    host_ = host_buf_.f32();
  }
  return host_;
}

void Transformer::params_changed() {
  if (shard_.stage >= 3) {
    // This rank's segment from the whole-block host copy, which is then freed; the slots refetch.
    if (shard_.end > shard_.begin)
      be_->upload(pshard_buf_.data(), host_params() + shard_.begin, (shard_.end - shard_.begin) * sizeof(float));
    drop_host_params();
    for (Slot& s : slots_) s.holds = -1;
    return;
  }
  if (!be_->on_host()) be_->upload(params_, host_, table_.total * sizeof(float));
  refresh_lowp(*be_, table_, params16_, params_);
}

void Transformer::sync_to_host() {
  if (shard_.stage >= 3) {
    if (shard_.end > shard_.begin)
      be_->download(host_params() + shard_.begin, pshard_buf_.data(), (shard_.end - shard_.begin) * sizeof(float));
    return;
  }
  if (!be_->on_host()) be_->download(host_, params_, table_.total * sizeof(float));
}

void Transformer::drop_host_params() {
  if (shard_.stage < 3) return;
  host_buf_.resize(0);
  host_ = nullptr;
}

void Transformer::synchronize() {
  if (!be_->on_host()) gpu::synchronize();
}

size_t Transformer::state_bytes() const {
  if (sharded()) {
    size_t bytes = pshard_buf_.size() + gshard_buf_.size() + params_buf_.size() + params16_buf_.size();
    for (const Slot& s : slots_) bytes += s.p.size() + s.p16.size() + s.g.size();
    return bytes;
  }
  return table_.total * (sizeof(float) * (grads_ ? 2 : 1) + (params16_ ? 2 : 0));
}

ParamBlocks Transformer::blocks() {
  if (!sharded()) return {params_, grads_, params16_, table_.total, be_.get()};
  // The segment: its gradients; its parameters in the whole block (stage 2) or alone (stage 3, no 16-bit copy:
  // the slots convert what they fetch).
  const size_t lo = shard_.begin, n = shard_.end - shard_.begin;
  float* g = gshard_buf_.as<float>();
  if (shard_.stage >= 3) return {pshard_buf_.as<float>(), g, nullptr, n, be_.get(), lo};
  return {params_ + lo, g, params16_ ? params16_ + lo : nullptr, n, be_.get(), lo};
}

void Transformer::Activations::allocate(nn::Workspace& ws, const ModelConfig& cfg, int64_t N, RecomputePolicy pol,
                                        int64_t ch, bool device) {
  const int C = cfg.d_model, L = cfg.n_layer;
  policy = pol;
  max_tokens = N;
  // Recomputation trades time for memory; then the logits (N×V, often the largest activation) are held
  // 64 rows at a time unless asked otherwise.
  if (ch <= 0 && pol.kind != RecomputePolicy::None) ch = 64;
  chunk = (ch <= 0 || ch > N) ? N : ch;
  logits_ld = padded_logits_ld(cfg.vocab_size, device);
  const bool selective = pol.kind == RecomputePolicy::Selective;
  const int kept = pol.kind == RecomputePolicy::Every ? std::min(pol.k, L) : L;
  encoded = ws.f32(N * C);
  blocks.assign(size_t(kept), {});
  out.assign(size_t(kept), nullptr);
  for (int i = 0; i < kept; i++) {
    // A segment's slot serves layers of either feed-forward kind.
    const nn::BlockShape S = pol.kind == RecomputePolicy::Every ? block_shape_all(cfg) : block_shape(cfg, i);
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
  logits = ws.act(chunk * logits_ld);
  losses = ws.f32(N);
  dres = ws.f32(N * C);
  scratch.allocate(ws, N, block_shape_all(cfg), selective);
  mtp.assign(size_t(cfg.mtp_depth), {});
  for (int k = 0; k < cfg.mtp_depth; k++) mtp[size_t(k)].allocate(ws, N, block_shape(cfg, L + k));
  if (cfg.mtp_depth > 0) {
    mtp_scratch.allocate(ws, N, C);
    if (device) {
      mtp_tokens = ws.i32(cfg.mtp_depth * N);
      mtp_targets = ws.i32(cfg.mtp_depth * N);
    }
  }
  if (device) {
    tokens = ws.i32(N);
    pos = ws.i32(N);
    targets = ws.i32(N);
    cu_seqlens = ws.i32(N + 1);
  }
}

size_t Transformer::plan_bytes(const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk,
                               bool device) {
  nn::Workspace measure(device ? DType::BF16 : DType::F32);
  Activations a;
  a.allocate(measure, cfg, N, policy, lm_head_chunk, device);
  return measure.peak();
}

size_t Transformer::plan(int B, int T, RecomputePolicy policy, int lm_head_chunk) {
  KILN_CHECK(T <= cfg_.max_positions, "sequence length ", T, " exceeds the model's context of ", cfg_.max_positions,
             " positions");
  const int64_t N = int64_t(B) * T;
  const bool device = !be_->on_host();
  ws_ = nn::Workspace(*be_, plan_bytes(cfg_, N, policy, lm_head_chunk, device), "activations");
  a_.allocate(ws_, cfg_, N, policy, lm_head_chunk, device);
  be_->reserve_scratch(training_scratch(cfg_, N));
  if (device) losses_host_.assign(size_t(N), 0.0f);
  return ws_.capacity();
}

void Transformer::run_blocks_forward(const AttentionParams& attn, int64_t N) {
  const int L = cfg_.n_layer;
  const float* x = a_.encoded;
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = 0; l < L; l++) {
      use_params(1 + l, l + 1 < L ? 2 + l : -1);  // stage 3: this layer's parameters, the next one's fetch started
      w_.blocks[size_t(l)].forward(*be_, a_.out[size_t(l)], x, a_.blocks[size_t(l)], a_.scratch, last_pos_, attn, N);
      count_load(l, a_.blocks[size_t(l)]);
      x = a_.out[size_t(l)];
    }
    return;
  }
  // every:K: block outputs go where they are kept (a segment's input, or the final output); the rest,
  // and the activations, use the segment buffers and are overwritten.
  const int K = a_.policy.k;
  for (int l = 0; l < L; l++) {
    float* y = l == L - 1 ? a_.final_out : ((l + 1) % K == 0 ? a_.ckpt_in[size_t((l + 1) / K)] : a_.out[size_t(l % K)]);
    use_params(1 + l, l + 1 < L ? 2 + l : -1);
    w_.blocks[size_t(l)].forward(*be_, y, x, a_.blocks[size_t(l % K)], a_.scratch, last_pos_, attn, N);
    count_load(l, a_.blocks[size_t(l % K)]);
    x = y;
  }
}

void Transformer::lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum, nn::Act x_all,
                          nn::Act dx_all) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  const int64_t ld = a_.logits_ld;
  nn::Weight head = w_.head;
  for (int64_t r0 = 0; r0 < N; r0 += a_.chunk) {
    const int64_t rows = std::min(a_.chunk, N - r0);
    const nn::Act x = x_all.at(r0 * C);
    be_->linear_forward(a_.logits, x, head, rows, ld);
    if (!targets) continue;
    be_->softmax_crossentropy(a_.logits, a_.losses + r0, targets + r0, rows, V, ld, grad_scale);
    if (grad_scale == 0.0f) continue;
    // The logits now hold their gradient: dlnf = dlogits · W, dW += dlogitsᵀ · lnf.
    be_->linear_backward(dx_all.at(r0 * C), a_.logits, x, head, rows, ld);
  }
  if (!targets) return;
  const float* losses =
      static_cast<const float*>(be_->to_host(losses_host_.data(), a_.losses, size_t(N) * sizeof(float)));
  for (int64_t i = 0; i < N; i++) *loss_sum += losses[i];
}

double Transformer::forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets,
                            const AttentionParams& attn, float grad_scale) {
  const int64_t N = attn.cu_seqlens ? attn.cu_seqlens[attn.num_seqs] : int64_t(attn.B) * attn.T;
  KILN_CHECK(N <= a_.max_tokens, "batch of ", N, " tokens exceeds the planned ", a_.max_tokens, " (call plan first)");
  KILN_CHECK(grad_scale == 0.0f || grads_ || sharded(), "training forward on a model built without gradients");
  const int C = cfg_.d_model;
  const size_t bytes = size_t(N) * sizeof(int32_t);
  // The integer inputs on the backend (views of the caller's arrays on the CPU).
  tokens = static_cast<const int32_t*>(be_->from_host(a_.tokens, tokens, bytes));
  pos = static_cast<const int32_t*>(be_->from_host(a_.pos, pos, bytes));
  const int32_t* host_targets = targets;
  if (targets) targets = static_cast<const int32_t*>(be_->from_host(a_.targets, targets, bytes));
  AttentionParams ap = attn;
  if (attn.cu_seqlens && !be_->on_host()) {
    // The device kernel reads cu_seqlens on the device and sizes its grid by the longest sequence.
    int64_t total = 0;
    const std::vector<AttentionSpan> spans = attention_spans(attn, total);
    KILN_CHECK(attn.num_seqs <= N, "packed batch: ", attn.num_seqs, " sequences in ", N, " tokens");
    int max_len = 0;
    for (const AttentionSpan& sp : spans) max_len = std::max(max_len, int(sp.len));
    ap.cu_seqlens = static_cast<const int32_t*>(
        be_->from_host(a_.cu_seqlens, attn.cu_seqlens, size_t(attn.num_seqs + 1) * sizeof(int32_t)));
    ap.max_seqlen = max_len;
    ap.total_tokens = N;
  }
  last_N_ = N;
  last_attn_ = ap;
  last_tokens_ = tokens;
  last_pos_ = pos;
  if (sharded()) shard_forward_begin(grad_scale != 0.0f);  // stage 3: the front and back parameters fetched
  be_->embedding_forward(a_.encoded, tokens, pos, w_.wte, w_.wpe, N, C);
  counting_ = grad_scale != 0.0f;  // the expert load of training forwards only
  aux_sum_ = 0;
  if (!moe_layers_.empty()) {
    // The balance loss's sequences (host spans), its weight and gradient scale, for every MoE layer.
    seq_starts_.clear();
    if (attn.cu_seqlens)
      seq_starts_.assign(attn.cu_seqlens, attn.cu_seqlens + attn.num_seqs + 1);
    else
      for (int b = 0; b <= attn.B; b++) seq_starts_.push_back(b * attn.T);
    for (int l : moe_layers_)
      if (l < cfg_.n_layer)  // the balance loss is the main model's (the MTP modules' routers: load only)
        w_.blocks[size_t(l)].moe.aux = {seq_aux_alpha_, grad_scale, seq_starts_.data(), int(seq_starts_.size()) - 1};
  }
  run_blocks_forward(ap, N);
  w_.final_norm.forward(*be_, a_.lnf_out, a_.lnf_mean, a_.lnf_rstd, a_.final_out, N);
  double sum = 0;
  lm_head(targets, grad_scale, N, &sum, a_.lnf_out, a_.dlnf);
  last_main_ = sum;
  mtp_ran_ = false;
  if (cfg_.mtp_depth > 0 && targets && mtp_lambda_ > 0) mtp_forward(host_targets, attn, grad_scale, N, &sum);
  return sum + aux_sum_;
}

const float* Model::final_hidden() const { fail("this model does not expose its final hidden state"); }
float* Model::final_hidden_grad() { fail("this model does not expose its final hidden state"); }

const float* Transformer::final_hidden() const {
  KILN_CHECK(be_->on_host() && a_.lnf_out.dtype == DType::F32,
             "the final hidden state is read on the CPU in fp32 (Medusa heads train there)");
  return static_cast<const float*>(a_.lnf_out.p);
}

float* Transformer::final_hidden_grad() {
  KILN_CHECK(be_->on_host() && a_.dlnf.dtype == DType::F32,
             "the final hidden state's gradient is written on the CPU in fp32 (Medusa heads train there)");
  return static_cast<float*>(a_.dlnf.p);
}

void Transformer::backward() {
  KILN_CHECK(grads_ || sharded(), "backward on a model built without gradients");
  const int64_t N = last_N_;
  const int C = cfg_.d_model, L = cfg_.n_layer;
  const int32_t* pos = last_pos_;
  be_->memset(a_.dres, 0, size_t(N) * C * sizeof(float));
  if (mtp_ran_) mtp_backward();  // the first module adds its share of dL/d(final block output) to dres
  w_.final_norm.backward(*be_, a_.dres, a_.dlnf, a_.final_out, a_.lnf_mean, a_.lnf_rstd, N);
  // The layers in the order backward_visits gives: each one's backward, and under every:K first the forward of
  // its segment recomputed from the segment's kept input (keeping every activation this time).
  const std::vector<std::pair<int, bool>> visits = backward_visits();
  const bool every = a_.policy.kind == RecomputePolicy::Every;
  const int K = every ? a_.policy.k : 1;
  for (size_t i = 0; i < visits.size(); i++) {
    const auto [l, back] = visits[i];
    use_params(1 + l, i + 1 < visits.size() ? 1 + visits[i + 1].first : -1);  // stage 3
    const int s = l / K * K, e = std::min(L, s + K), seg = l / K;
    // The layer's input and its activations.
    const float* x = !every ? (l ? a_.out[size_t(l - 1)] : a_.encoded)
                            : (l == s ? a_.ckpt_in[size_t(seg)] : a_.out[size_t(l - s - 1)]);
    nn::BlockActivations& act = a_.blocks[size_t(every ? l - s : l)];
    if (!back) {
      float* y = l == e - 1 ? nullptr : a_.out[size_t(l - s)];  // the segment's output is not needed
      w_.blocks[size_t(l)].forward(*be_, y, x, act, a_.scratch, pos, last_attn_, N);
      continue;
    }
    grad_begin(1 + l);  // sharded: the layer's gradient buffer, free and cleared
    w_.blocks[size_t(l)].backward(*be_, a_.dres, x, act, a_.scratch, pos, last_attn_, N);
    grad_end(1 + l);    // sharded: handed to the exchange
    layer_grads_done(l);
  }
  be_->embedding_backward(w_.dwte, w_.dwpe, a_.dres, last_tokens_, pos, N, C);
  if (sharded()) shard_backward_end();
}

void Transformer::zero_grad() {
  if (sharded()) {
    be_->memset(gshard_buf_.data(), 0, gshard_buf_.size());
    return;
  }
  if (grads_) be_->memset(grads_, 0, table_.total * sizeof(float));
}

const float* Transformer::logits() const {
  if (be_->on_host()) return a_.logits.f32();
  // A device's logits are bf16 rows of a padded stride: brought back and widened.
  KILN_CHECK(last_N_ <= a_.chunk, "logits(): the last forward held ", a_.chunk, " of its ", last_N_, " rows");
  const int V = cfg_.vocab_size;
  const int64_t ld = a_.logits_ld;
  logits16_.resize(size_t(last_N_ * ld));
  be_->download(logits16_.data(), a_.logits.p, logits16_.size() * sizeof(uint16_t));
  logits_host_.resize(size_t(last_N_) * size_t(V));
  for (int64_t r = 0; r < last_N_; r++)
    for (int v = 0; v < V; v++) logits_host_[size_t(r * V + v)] = bf16_to_f32(logits16_[size_t(r * ld + v)]);
  return logits_host_.data();
}

// ---- decoding ----

TransformerDecoder::TransformerDecoder(const ModelConfig& cfg, const float* params, int batch, int max_positions,
                                       bool cuda, bool cuda_graph, WeightFormat weights)
    : cfg_(cfg), table_(model_param_table(cfg)), be_(make_backend(cuda, std::nullopt)), batch_(batch) {
  cfg_.validate("decoder config");
  if (cuda) check_device_shapes(cfg_);
  KILN_CHECK(batch >= 1, "decoder: batch must be at least 1, got ", batch);
  max_pos_ = max_positions > 0 ? max_positions : cfg_.max_positions;
  KILN_CHECK(max_pos_ <= cfg_.max_positions, "decoder: max_positions ", max_pos_,
             " exceeds the model's context of ", cfg_.max_positions);
  weights_.load(*be_, cfg_, table_, params, w_, weights);
  // Latent attention caches c_KV and the rotary key per position in k_ (no values); the others keys and values.
  const size_t cache = size_t(cfg_.n_layer) * size_t(batch) * size_t(max_pos_) * size_t(cache_width()) *
                       dtype_size(be_->act_dtype());
  k_ = nn::DeviceBlock(*be_, cache, "KV cache (keys)");
  // Zeroed: a GPU kernel reads whole tiles past the cached length (masked), which must not be NaN patterns.
  be_->memset(k_.data(), 0, cache);
  if (!cfg_.mla.on()) {
    v_ = nn::DeviceBlock(*be_, cache, "KV cache (values)");
    be_->memset(v_.data(), 0, cache);
  }
  if (self_draft_depth() > 0) {  // the draft's one-layer caches and hidden states, one per module
    const int D = cfg_.mtp_depth;
    const size_t one = cache / size_t(cfg_.n_layer) * size_t(D);
    mtp_k_ = nn::DeviceBlock(*be_, one, "MTP draft cache (keys)");
    be_->memset(mtp_k_.data(), 0, one);
    if (!cfg_.mla.on()) {
      mtp_v_ = nn::DeviceBlock(*be_, one, "MTP draft cache (values)");
      be_->memset(mtp_v_.data(), 0, one);
    }
    const size_t hist = size_t(D) * size_t(max_pos_) * size_t(cfg_.d_model) * sizeof(float);
    mtp_hist_ = nn::DeviceBlock(*be_, hist, "MTP draft hidden states");
    mtp_used_.assign(size_t(D), std::vector<int32_t>(size_t(max_pos_), -1));
    mtp_len_.assign(size_t(D), 0);
    mtp_dirty_.assign(size_t(D), 0);
    tok_hist_.reserve(size_t(max_pos_));
  }
  // The decode attention's scratch for the longest piece of queries against the whole cache.
  nn::OpScratch ops;
  ops.decode.B = batch;
  ops.decode.Tq = std::min(kMaxChunk, be_->max_decode_queries());
  ops.decode.max_past = max_pos_;
  ops.decode.NH = cfg_.n_head;
  ops.decode.NKV = cfg_.n_kv_head;
  ops.decode.HD = cfg_.head_dim;
  if (cfg_.mla.on()) {  // the absorbed form: one shared head of the cached latent row, values its first r floats
    ops.decode.NKV = 1;
    ops.decode.HD = int(cache_width());
    ops.decode.HDv = cfg_.mla.kv_lora_rank;
  }
  weights_.narrow.plan(ops, int64_t(batch) * kMaxChunk);  // a chunk of every sequence
  be_->reserve_scratch(ops);
  use_graph_ = cuda && cuda_graph;
  if (use_graph_) {
    inputs_h_ = static_cast<int32_t*>(gpu::malloc_host(size_t(3 * batch) * sizeof(int32_t), "decoder step inputs"));
    argmax_h_ = static_cast<int32_t*>(gpu::malloc_host(size_t(batch) * sizeof(int32_t), "decoder arg max"));
    logits_h_ = static_cast<float*>(
        gpu::malloc_host(size_t(batch) * size_t(cfg_.vocab_size) * sizeof(float), "decoder step logits"));
  }
}

int64_t TransformerDecoder::cache_width() const {
  return cfg_.mla.on() ? cfg_.mla.kv_lora_rank + cfg_.mla.qk_rope_dim : cfg_.kv_dim();
}

void TransformerDecoder::set_latent_absorbed(bool absorbed) {
  KILN_CHECK(cfg_.mla.on(), "decoder: the absorbed/plain choice is latent attention's (", cfg_.family, " has none)");
  absorbed_ = absorbed;
  if (absorbed || expand_.data()) return;
  const nn::MLAShape M = block_shape(cfg_, 0).mla;
  const int64_t P = max_pos_;
  const int64_t n = P * (M.r + M.kv()) + int64_t(batch_) * P * (int64_t(M.NH) * M.qk() + M.att());
  expand_ = nn::DeviceBlock(*be_, size_t(n) * dtype_size(be_->act_dtype()), "latent attention expansion");
}

TransformerDecoder::~TransformerDecoder() {
  if (!use_graph_) return;
  gpu::free_host(inputs_h_);
  gpu::free_host(argmax_h_);
  gpu::free_host(logits_h_);
}

void TransformerDecoder::ensure_rows(int64_t rows) {
  if (rows <= rows_) return;
  const int C = cfg_.d_model, B = batch_, V = cfg_.vocab_size;
  const bool device = !be_->on_host();
  auto carve = [&](nn::Workspace& ws) {
    x_ = ws.f32(rows * C);
    last_ = ws.f32(int64_t(B) * C);
    ln_ = ws.act(rows * C);
    mean_ = ws.f32(rows);
    rstd_ = ws.f32(rows);
    const nn::BlockShape S = block_shape_all(cfg_);
    a_.allocate(ws, rows, S, false, /*decoding=*/true);
    if (S.moe) s_.moe.allocate(ws, rows, S.moe);  // the router logits and gathered rows
    a_.h = nullptr;  // the stream is updated in place
    if (cfg_.mtp_depth > 0) {
      mtp_a_.allocate(ws, rows, block_shape(cfg_, cfg_.n_layer), /*decoding=*/true);
      mtp_zeros_ = ws.f32(rows * C);
    }
    logits_d_ = ws.f32(int64_t(B) * V);
    argmax_d_ = ws.i32(B);
    inputs_d_ = device ? ws.i32(2 * rows + B) : nullptr;
  };
  nn::Workspace measure(be_->act_dtype());
  carve(measure);
  ws_ = nn::Workspace(*be_, measure.peak(), "decoder activations");
  carve(ws_);
  rows_ = rows;
  ws_epoch_++;
}

void TransformerDecoder::stage_inputs(int32_t* dst, const int32_t* tokens, int n, int64_t tok_stride) const {
  const int B = batch_, V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * n;
  for (int b = 0; b < B; b++) {
    dst[2 * N + b] = length_;
    for (int i = 0; i < n; i++) {
      const int32_t t = tokens[b * tok_stride + i];
      KILN_CHECK(t >= 0 && t < V, "token id ", t, " is outside the model's vocabulary [0, ", V, ")");
      dst[b * n + i] = t;
      dst[N + b * n + i] = length_ + i;
    }
  }
}

void TransformerDecoder::run_chunk(const int32_t* tokens, int n, int64_t tok_stride) {
  const int64_t N = int64_t(batch_) * n;
  ensure_rows(N);
  // Tokens, positions and cached lengths side by side: one copy brings them to a device.
  inputs_.resize(size_t(2 * N + batch_));
  stage_inputs(inputs_.data(), tokens, n, tok_stride);
  const int32_t* tok =
      static_cast<const int32_t*>(be_->from_host(inputs_d_, inputs_.data(), inputs_.size() * sizeof(int32_t)));
  run_layers(tok, tok + N, tok + 2 * N, n);
  note_forward(tokens, length_, n);
  length_ += n;
}

void TransformerDecoder::run_layers(const int32_t* tok, const int32_t* pos, const int32_t* past, int n) {
  const int B = batch_, C = cfg_.d_model;
  const int64_t N = int64_t(B) * n;
  be_->embedding_forward(x_, tok, pos, w_.wte, w_.wpe, N, C);
  // A fresh prompt attends within itself (FlashAttention over B rows of n); later tokens attend to the cache.
  const AttentionParams flash = attention_params(cfg_, B, n);
  const int64_t layer_cache = int64_t(B) * max_pos_ * cache_width();
  const nn::Act k{k_.data(), be_->act_dtype()}, v{v_.data(), be_->act_dtype()};
  for (int l = 0; l < cfg_.n_layer; l++) {
    nn::KVLayer cache;
    cache.k = k.at(l * layer_cache);
    cache.v = v.at(l * layer_cache);
    cache.batch_stride = int64_t(max_pos_) * cache_width();
    cache.past = past;
    cache.max_positions = max_pos_;
    cache.B = B;
    cache.Tq = n;
    cache.fresh = length_ == 0 && n > 1;
    cache.tree = tree_;
    if (cfg_.mla.on()) {
      cache.absorbed = absorbed_;
      const nn::MLAShape M = block_shape(cfg_, l).mla;
      const DType t = be_->act_dtype();
      const int64_t P = max_pos_;
      nn::Act e{expand_.data(), t};
      cache.expand_c = e;
      cache.expand_kv = e.at(P * M.r);
      cache.expand_k = e.at(P * (M.r + M.kv()));
      cache.expand_v = e.at(P * (M.r + M.kv()) + int64_t(B) * P * M.NH * M.qk());
      if (!expand_.data()) cache.expand_c = cache.expand_kv = cache.expand_k = cache.expand_v = nn::Act{};
    }
    w_.blocks[size_t(l)].forward(*be_, x_, x_, a_, s_, pos, flash, N, &cache);
  }
}

bool TransformerDecoder::graph_step(const int32_t* tokens, int n, bool argmax, int limit) {
  if (!use_graph_ || n != 1 || length_ == 0) return false;
  StepGraph& g = graphs_[argmax ? 1 : 0];
  if (g.eager_runs < 1) {  // one eager step first: it sets up cuBLASLt's plans, which a capture cannot
    g.eager_runs++;
    return false;
  }
  KILN_CHECK(length_ + 1 <= max_pos_, "decoder: ", length_, " cached + 1 new positions exceed the context of ",
             max_pos_, " positions");
  const int B = batch_, V = cfg_.vocab_size;
  ensure_rows(B);
  stage_inputs(inputs_h_, tokens, 1, 1);
  if (!g.graph.ready() || g.limit != limit || g.epoch != ws_epoch_) {
    g.graph.begin();
    gpu::copy_to_device(inputs_d_, inputs_h_, size_t(3 * B) * sizeof(int32_t));
    // length_ only decides `fresh` (false for every step): positions and cache lengths come from inputs_d_.
    run_layers(inputs_d_, inputs_d_ + B, inputs_d_ + 2 * B, 1);
    last_logits(1);
    if (argmax) {
      be_->argmax_rows(argmax_d_, logits_d_, B, limit, V);
      gpu::copy_to_host_async(argmax_h_, argmax_d_, size_t(B) * sizeof(int32_t));
    } else {
      gpu::copy_to_host_async(logits_h_, logits_d_, size_t(B) * size_t(V) * sizeof(float));
    }
    g.graph.end();
    g.limit = limit;
    g.epoch = ws_epoch_;
  }
  g.graph.launch();
  hidden_rows_ = B;
  note_forward(tokens, length_, 1);
  gpu::synchronize();
  length_ += 1;
  return true;
}

// logits[rows, V] = FinalNorm(hidden) · Wᵀ (fp32 logits on the backend).
void TransformerDecoder::lm_head(const float* hidden, int64_t rows, float* logits) {
  w_.final_norm.forward(*be_, ln_, mean_, rstd_, hidden, rows);
  be_->linear_forward(nn::Act{logits, DType::F32}, ln_, w_.head, rows);
}

void TransformerDecoder::advance(const int32_t* tokens, int n, bool all_logits) {
  KILN_CHECK(n >= 1, "decoder: forward needs at least one token per sequence");
  KILN_CHECK(int64_t(length_) + n <= max_pos_, "decoder: ", length_, " cached + ", n,
             " new positions exceed the context of ", max_pos_, " positions");
  const int B = batch_, V = cfg_.vocab_size;
  if (all_logits) logits_.resize(size_t(B) * size_t(n) * size_t(V));
  for (int c0 = 0; c0 < n;) {
    // An empty cache takes whole chunks through FlashAttention; later positions go through the decode
    // attention, as many queries at a time as the backend's kernel takes.
    const int limit = length_ == 0 ? kMaxChunk : std::min(kMaxChunk, be_->max_decode_queries());
    const int m = std::min(limit, n - c0);
    run_chunk(tokens + c0, m, n);
    if (all_logits) {
      // Rows of this chunk are [B][m]; their logits go to [B][n][V] at column c0.
      const size_t bytes = sizeof(float) * size_t(B) * m * V;
      if (all_d_.size() < bytes) all_d_ = nn::DeviceBlock(*be_, bytes, "decoder logits");
      lm_head(x_, int64_t(B) * m, all_d_.as<float>());
      hidden_rows_ = B * m;
      std::vector<float> host(be_->on_host() ? 0 : size_t(B) * m * V);
      const float* chunk_logits = static_cast<const float*>(be_->to_host(host.data(), all_d_.data(), bytes));
      for (int b = 0; b < B; b++)
        std::memcpy(logits_.data() + (size_t(b) * n + c0) * V, chunk_logits + size_t(b) * m * V,
                    sizeof(float) * size_t(m) * V);
    }
    c0 += m;
    if (c0 == n && !all_logits) last_logits(m);
  }
}

void TransformerDecoder::last_logits(int m) {
  const int C = cfg_.d_model;
  // Each sequence's last row of the chunk ([B][m] rows of C).
  be_->copy_rows(nn::Act{last_, DType::F32}, C, nn::Act{x_ + int64_t(m - 1) * C, DType::F32}, int64_t(m) * C, batch_,
                 C);
  lm_head(last_, batch_, logits_d_);
  hidden_rows_ = batch_;
}

const float* TransformerDecoder::forward(const int32_t* tokens, int n, bool all_logits) {
  if (!all_logits && graph_step(tokens, n, false, cfg_.vocab_size)) return logits_h_;
  advance(tokens, n, all_logits);
  if (all_logits) return logits_.data();
  const size_t bytes = sizeof(float) * size_t(batch_) * size_t(cfg_.vocab_size);
  if (!be_->on_host()) logits_.resize(bytes / sizeof(float));
  return static_cast<const float*>(be_->to_host(logits_.data(), logits_d_, bytes));
}

const int32_t* TransformerDecoder::forward_argmax(const int32_t* tokens, int n, int vocab_limit) {
  const int V = cfg_.vocab_size;
  KILN_CHECK(vocab_limit >= 1 && vocab_limit <= V, "decoder: arg max over ", vocab_limit, " ids of a ", V,
             "-token vocabulary");
  if (graph_step(tokens, n, true, vocab_limit)) return argmax_h_;
  advance(tokens, n, false);
  be_->argmax_rows(argmax_d_, logits_d_, batch_, vocab_limit, V);
  argmax_.resize(size_t(batch_));
  return static_cast<const int32_t*>(be_->to_host(argmax_.data(), argmax_d_, argmax_.size() * sizeof(int32_t)));
}

}  // namespace kiln
