// Tiny random models of every family for the GGUF tests: a ModelConfig, a ParamTable under the Hugging Face
// names and the canonical keys, a random parameter block and a small byte-level BPE vocabulary.
// Built here (not by models/families) so the export tests depend only on ModelConfig and ParamTable.
#pragma once
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/gguf_export.h"
#include "models/model_config.h"
#include "models/param_table.h"

namespace kiln::test {

// gpt2, llama (Llama 3 rope scaling), mistral (untied head, rows of 48: Q8_0 falls back to F16 for most
// matrices), qwen2 (q/k/v biases), qwen3 (q/k norms, head_dim != d_model / n_head).
inline ModelConfig tiny_config(const std::string& family) {
  ModelConfig c;
  c.family = family;
  c.n_layer = 2;
  c.d_model = 64;
  c.n_head = 4;
  c.n_kv_head = 2;
  c.head_dim = 16;
  c.d_ff = 128;
  c.vocab_size = 320;
  c.max_positions = 128;
  c.eos_token_id = 319;
  if (family == "gpt2") {
    c.n_kv_head = 4;
    c.d_ff = 256;
    c.qkv_bias = c.attn_out_bias = c.ffn_bias = true;
    c.layout = WeightLayout::InOut;
    return c;
  }
  c.norm = NormKind::RMSNorm;
  c.norm_bias = false;
  c.norm_eps = 1e-6f;
  c.positions = PositionKind::Rotary;
  c.gated_ffn = true;
  c.activation = Activation::Silu;
  if (family == "llama") {
    c.rope_theta = 500000.0;
    c.rope_scaling.kind = RopeScaling::Llama3;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.original_max_positions = 32;  // small, so the tiny context spans all three bands
  } else if (family == "mistral") {
    c.d_model = 48;
    c.head_dim = 12;
    c.tie_embeddings = false;
  } else if (family == "qwen2") {
    c.qkv_bias = true;
    c.rope_theta = 1000000.0;
  } else if (family == "qwen3") {
    c.qk_norm = true;
    c.head_dim = 32;  // q_dim 128 != d_model 64
    c.rope_theta = 1000000.0;
  } else {
    fail("tiny_config: unknown family ", family);
  }
  return c;
}

inline ParamTable tiny_table(const ModelConfig& c) {
  ParamTable t;
  const int64_t C = c.d_model, V = c.vocab_size, F = c.d_ff;
  if (c.family == "gpt2") {  // Conv1D [in, out]
    t.add("transformer.wte.weight", "token_embd.weight", {V, C});
    t.add("transformer.wpe.weight", "position_embd.weight", {c.max_positions, C});
    for (int l = 0; l < c.n_layer; l++) {
      const std::string h = "transformer.h." + std::to_string(l) + ".", b = "blk." + std::to_string(l) + ".";
      t.add(h + "ln_1.weight", b + "attn_norm.weight", {C});
      t.add(h + "ln_1.bias", b + "attn_norm.bias", {C});
      t.add(h + "attn.c_attn.weight", b + "attn_qkv.weight", {C, 3 * C});
      t.add(h + "attn.c_attn.bias", b + "attn_qkv.bias", {3 * C});
      t.add(h + "attn.c_proj.weight", b + "attn_output.weight", {C, C});
      t.add(h + "attn.c_proj.bias", b + "attn_output.bias", {C});
      t.add(h + "ln_2.weight", b + "ffn_norm.weight", {C});
      t.add(h + "ln_2.bias", b + "ffn_norm.bias", {C});
      t.add(h + "mlp.c_fc.weight", b + "ffn_up.weight", {C, F});
      t.add(h + "mlp.c_fc.bias", b + "ffn_up.bias", {F});
      t.add(h + "mlp.c_proj.weight", b + "ffn_down.weight", {F, C});
      t.add(h + "mlp.c_proj.bias", b + "ffn_down.bias", {C});
    }
    t.add("transformer.ln_f.weight", "output_norm.weight", {C});
    t.add("transformer.ln_f.bias", "output_norm.bias", {C});
    return t;
  }
  t.add("model.embed_tokens.weight", "token_embd.weight", {V, C});
  for (int l = 0; l < c.n_layer; l++) {
    const std::string h = "model.layers." + std::to_string(l) + ".", b = "blk." + std::to_string(l) + ".";
    t.add(h + "input_layernorm.weight", b + "attn_norm.weight", {C});
    t.add(h + "self_attn.q_proj.weight", b + "attn_q.weight", {c.q_dim(), C});
    t.add(h + "self_attn.k_proj.weight", b + "attn_k.weight", {c.kv_dim(), C}, true);
    t.add(h + "self_attn.v_proj.weight", b + "attn_v.weight", {c.kv_dim(), C}, true);
    if (c.qkv_bias) {
      t.add(h + "self_attn.q_proj.bias", b + "attn_q.bias", {c.q_dim()});
      t.add(h + "self_attn.k_proj.bias", b + "attn_k.bias", {c.kv_dim()}, true);
      t.add(h + "self_attn.v_proj.bias", b + "attn_v.bias", {c.kv_dim()}, true);
    }
    if (c.qk_norm) {
      t.add(h + "self_attn.q_norm.weight", b + "attn_q_norm.weight", {c.head_dim});
      t.add(h + "self_attn.k_norm.weight", b + "attn_k_norm.weight", {c.head_dim});
    }
    t.add(h + "self_attn.o_proj.weight", b + "attn_output.weight", {C, c.q_dim()});
    t.add(h + "post_attention_layernorm.weight", b + "ffn_norm.weight", {C});
    t.add(h + "mlp.gate_proj.weight", b + "ffn_gate.weight", {F, C});
    t.add(h + "mlp.up_proj.weight", b + "ffn_up.weight", {F, C}, true);
    t.add(h + "mlp.down_proj.weight", b + "ffn_down.weight", {C, F});
  }
  t.add("model.norm.weight", "output_norm.weight", {C});
  if (!c.tie_embeddings) t.add("lm_head.weight", "output.weight", {V, C});
  return t;
}

// Norm weights near 1, embeddings of unit scale, matrices and biases small: logits spread by several units,
// so greedy choices have wide margins.
inline std::vector<float> tiny_params(const ParamTable& t, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(t.total, 0.0f);
  for (const auto& s : t.specs) {
    const bool norm = s.key.find("norm") != std::string::npos;
    const bool embd = s.key.find("embd") != std::string::npos;
    const float scale = norm ? 0.1f : embd ? 1.0f : s.shape.ndim == 1 ? 0.05f : 1.5f / std::sqrt(float(s.shape[1]));
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + i] = (norm && s.key.find(".bias") == std::string::npos ? 1.0f : 0.0f) + scale * normal(rng);
  }
  return p;
}

// GPT-2's byte-to-unicode spelling of one byte.
inline std::string byte_token(int b) {
  auto utf8 = [](int cp) {
    std::string s;
    if (cp < 0x80) s += char(cp);
    else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    return s;
  };
  if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)) return utf8(b);
  int n = 0;  // the other bytes map to 256, 257, ... in byte order
  for (int x = 0; x < b; x++)
    if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
  return utf8(256 + n);
}

// 256 byte tokens, then merges of letter pairs, then one control token "<|endoftext|>" as the last id.
inline GgufTokenizer tiny_tokenizer(int vocab, const std::string& pre) {
  GgufTokenizer t;
  for (int b = 0; b < 256; b++) t.tokens.push_back(byte_token(b));
  for (char x = 'a'; x <= 'z' && int(t.tokens.size()) < vocab - 1; x++)
    for (char y = 'a'; y <= 'z' && int(t.tokens.size()) < vocab - 1; y++) {
      t.merges.push_back(std::string(1, x) + " " + y);
      t.tokens.push_back(std::string(1, x) + y);
    }
  t.tokens.push_back("<|endoftext|>");
  t.token_type.assign(t.tokens.size(), 1);
  t.token_type.back() = 3;
  t.bos_id = t.eos_id = vocab - 1;
  t.pre = pre;
  t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  return t;
}

inline std::string tiny_pre(const std::string& family) {
  return family == "gpt2" ? "gpt-2" : family == "qwen2" || family == "qwen3" ? "qwen2" : "llama-bpe";
}

}  // namespace kiln::test
