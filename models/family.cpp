#include "models/family.h"

#include <filesystem>

#include "core/error.h"
#include "core/quote.h"
#include "core/file_io.h"

namespace kiln {

extern const Family kGpt2Family, kLlamaFamily, kMistralFamily, kQwen2Family, kQwen3Family, kQwen3MoeFamily,
    kDeepseekV3Family;

const std::vector<const Family*>& families() {
  static const std::vector<const Family*> all = {&kGpt2Family,  &kLlamaFamily,    &kMistralFamily,   &kQwen2Family,
                                                 &kQwen3Family, &kQwen3MoeFamily, &kDeepseekV3Family};
  return all;
}

const Family& find_family(const std::string& model_type, const std::string& where) {
  std::string known;
  for (const Family* f : families()) {
    if (model_type == f->model_type) return *f;
    known += std::string(known.empty() ? "" : ", ") + f->model_type;
  }
  fail(where, ": model_type ", quote_name(model_type), " is not supported (", known, ")");
}

ModelConfig parse_model_config(const std::string& text, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": malformed JSON (", e.what(), ")");
  }
  KILN_CHECK(j.is_object(), where, ": expected a JSON object");
  std::string type;
  if (j.contains("model_type")) {
    KILN_CHECK(j["model_type"].is_string(), where, ": field model_type must be a string");
    type = j["model_type"].get<std::string>();
  } else {
    // kiln's first checkpoints wrote GPT-2 configs without one: GPT-2's own keys say which family it is.
    const bool gpt2 = j.contains("n_embd") || j.contains("n_layer") || j.contains("n_head") || j.contains("n_positions");
    KILN_CHECK(gpt2, where, ": missing field model_type");
    type = "gpt2";
  }
  ModelConfig c = find_family(type, where).parse(j, where);
  c.validate(where);
  c.source_json = text;
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  namespace fs = std::filesystem;
  std::string file = path;
  if (fs::is_directory(path)) file = (fs::path(path) / "config.json").string();
  KILN_CHECK(fs::exists(file), file, ": no such file");
  return parse_model_config(read_file(file), file);
}

std::string map_tensor_name(const std::string& key, NamePairs top, NamePairs part, const char* layer_prefix,
                            const char* family) {
  for (const auto& [k, n] : top)
    if (key == k) return n;
  const size_t a = key.find('.', 4), b = key.rfind('.');
  if (key.rfind("blk.", 0) == 0 && a != std::string::npos && b > a) {
    const std::string layer = key.substr(4, a - 4), name = key.substr(a + 1, b - a - 1);
    for (const auto& [k, n] : part)
      if (name == k) return layer_prefix + layer + "." + n + key.substr(b);
  }
  fail("no ", family, " name for tensor ", key);
}

std::string model_config_json(const ModelConfig& cfg) {
  const Family& f = find_family(cfg.family, "model config");
  // Fields of the source config kiln does not use are kept (with kiln's values over them).
  nlohmann::json j = nlohmann::json::object();
  if (!cfg.source_json.empty()) {
    nlohmann::json src = nlohmann::json::parse(cfg.source_json, nullptr, false);
    if (src.is_object()) j = src;
  }
  const nlohmann::json ours = f.to_json(cfg);
  for (auto& [k, v] : ours.items()) j[k] = v;
  j["architectures"] = {f.architecture};
  j["model_type"] = f.model_type;
  return j.dump(2) + "\n";
}

ParamTable model_param_table(const ModelConfig& c) {
  const Family& f = find_family(c.family, "model config");
  ParamTable t;
  auto add = [&](const std::string& key, Shape shape, bool packed = false) {
    t.add(f.file_name(key), key, shape, packed);
  };
  const int64_t C = c.d_model, V = c.vocab_size, F = c.d_ff, HD = c.head_dim;
  const bool inout = c.layout == WeightLayout::InOut;
  // A linear map from `in` to `out` features as the family stores it.
  auto matrix = [&](int64_t in, int64_t out) { return inout ? Shape{in, out} : Shape{out, in}; };
  const bool ln_bias = c.norm == NormKind::LayerNorm && c.norm_bias;
  auto norm = [&](const std::string& p) {
    add(p + ".weight", {C});
    if (ln_bias) add(p + ".bias", {C});
  };
  add("token_embd.weight", {V, C});
  if (c.positions == PositionKind::Learned) add("position_embd.weight", {c.max_positions, C});
  for (int l = 0; l < c.n_layer + c.mtp_depth; l++) {
    const std::string b = "blk." + std::to_string(l) + ".";
    if (l >= c.n_layer) {
      // A multi-token-prediction module: its norms and projection, then an ordinary block.
      norm(b + "nextn.enorm");
      norm(b + "nextn.hnorm");
      add(b + "nextn.eh_proj.weight", matrix(2 * C, C));
      norm(b + "nextn.shared_head_norm");
    }
    norm(b + "attn_norm");
    if (c.mla.on()) {
      // Latent attention (llama.cpp's deepseek2 names); the query projection (or its bottleneck) and
      // kv_a_mqa back to back: one product.
      const LatentAttention& m = c.mla;
      const int64_t NH = c.n_head, qk = m.qk_dim(), r = m.kv_lora_rank;
      if (m.q_lora_rank) {
        add(b + "attn_q_a.weight", matrix(C, m.q_lora_rank));
        add(b + "attn_kv_a_mqa.weight", matrix(C, r + m.qk_rope_dim), true);
        add(b + "attn_q_a_norm.weight", {m.q_lora_rank});
        add(b + "attn_q_b.weight", matrix(m.q_lora_rank, NH * qk));
      } else {
        add(b + "attn_q.weight", matrix(C, NH * qk));
        add(b + "attn_kv_a_mqa.weight", matrix(C, r + m.qk_rope_dim), true);
      }
      add(b + "attn_kv_a_norm.weight", {r});
      add(b + "attn_kv_b.weight", matrix(r, NH * (m.qk_nope_dim + m.v_head_dim)));
      add(b + "attn_output.weight", matrix(NH * m.v_head_dim, C));
    } else if (inout) {
      add(b + "attn_qkv.weight", matrix(C, c.qkv_dim()));
      if (c.qkv_bias) add(b + "attn_qkv.bias", {c.qkv_dim()});
    } else {
      // q, k, v back to back: one [q + 2·kv, C] matrix, one product.
      add(b + "attn_q.weight", matrix(C, c.q_dim()));
      add(b + "attn_k.weight", matrix(C, c.kv_dim()), true);
      add(b + "attn_v.weight", matrix(C, c.kv_dim()), true);
      if (c.qkv_bias) {
        add(b + "attn_q.bias", {c.q_dim()});
        add(b + "attn_k.bias", {c.kv_dim()}, true);
        add(b + "attn_v.bias", {c.kv_dim()}, true);
      }
    }
    if (c.qk_norm) {
      add(b + "attn_q_norm.weight", {HD});
      add(b + "attn_k_norm.weight", {HD});
    }
    if (!c.mla.on()) add(b + "attn_output.weight", matrix(c.q_dim(), C));
    if (c.attn_out_bias) add(b + "attn_output.bias", {C});
    norm(b + "ffn_norm");
    if (c.is_moe_layer(l)) {
      // Router, selection bias, the stacked routed experts (one tensor per expert in the files), the shared
      // experts as one SwiGLU with gate and up back to back.
      const int64_t E = c.n_experts, MF = c.moe_d_ff, SF = int64_t(c.n_shared_experts) * MF;
      add(b + "ffn_gate_inp.weight", {E, C});
      if (c.moe_router_bias) {
        add(b + "exp_probs_b.bias", {E});
        t.specs.back().trainable = false;  // moved by the balancing update, never by AdamW
      }
      for (const char* k : {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}) {
        const bool down = k[4] == 'd';
        add(b + k + ".weight", down ? Shape{E, C, MF} : Shape{E, MF, C});
        t.split_last();
      }
      if (SF) {
        add(b + "ffn_gate_shexp.weight", {SF, C});
        add(b + "ffn_up_shexp.weight", {SF, C}, true);
        add(b + "ffn_down_shexp.weight", {C, SF});
      }
      continue;
    }
    if (c.gated_ffn) {
      // gate and up back to back: one [2F, C] matrix whose output rows are [gate | up].
      add(b + "ffn_gate.weight", matrix(C, F));
      add(b + "ffn_up.weight", matrix(C, F), true);
      if (c.ffn_bias) {
        add(b + "ffn_gate.bias", {F});
        add(b + "ffn_up.bias", {F}, true);
      }
    } else {
      add(b + "ffn_up.weight", matrix(C, F));
      if (c.ffn_bias) add(b + "ffn_up.bias", {F});
    }
    add(b + "ffn_down.weight", matrix(F, C));
    if (c.ffn_bias) add(b + "ffn_down.bias", {C});
  }
  norm("output_norm");
  if (!c.tie_embeddings) add("output.weight", {V, C});
  return t;
}

}  // namespace kiln
