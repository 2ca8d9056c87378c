// GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm with biases, fused Conv1D c_attn [in, out], a GELU MLP
// with biases everywhere, and the LM head tied to the token embedding.
#include "core/error.h"
#include "models/families/hf_llama.h"
#include "models/family.h"

namespace kiln {
namespace {

ModelConfig parse(const nlohmann::json& j, const std::string& where) {
  ModelConfig c;
  c.family = "gpt2";
  c.layout = WeightLayout::InOut;
  c.n_layer = hf::get_int(j, "n_layer", where);
  c.n_head = hf::get_int(j, "n_head", where);
  c.d_model = hf::get_int(j, "n_embd", where);
  c.vocab_size = hf::get_int(j, "vocab_size", where);
  c.max_positions = hf::get_int(j, "n_positions", where);
  KILN_CHECK(c.n_head > 0 && c.d_model % c.n_head == 0, where, ": n_embd (", c.d_model,
             ") is not divisible by n_head (", c.n_head, ")");
  c.n_kv_head = c.n_head;
  c.head_dim = c.d_model / c.n_head;
  c.d_ff = hf::get_int(j, "n_inner", where, 4 * c.d_model);
  c.norm_eps = float(hf::get_number(j, "layer_norm_epsilon", where, 1e-5));
  c.activation = hf::parse_activation(j, "activation_function", where, Activation::GeluTanh);
  c.qkv_bias = c.attn_out_bias = c.ffn_bias = true;
  c.tie_embeddings = true;
  c.bos_token_id = hf::get_int(j, "bos_token_id", where, c.vocab_size - 1);
  c.eos_token_id = hf::get_int(j, "eos_token_id", where, c.vocab_size - 1);
  return c;
}

nlohmann::json to_json(const ModelConfig& c) {
  return {{"activation_function", c.activation == Activation::GeluTanh ? "gelu_new" : hf::activation_name(c.activation)},
          {"n_layer", c.n_layer},
          {"n_head", c.n_head},
          {"n_embd", c.d_model},
          {"n_inner", c.d_ff == 4 * c.d_model ? nlohmann::json(nullptr) : nlohmann::json(c.d_ff)},
          {"vocab_size", c.vocab_size},
          {"n_positions", c.max_positions},
          {"n_ctx", c.max_positions},
          {"layer_norm_epsilon", c.norm_eps},
          {"resid_pdrop", 0.0},
          {"embd_pdrop", 0.0},
          {"attn_pdrop", 0.0},
          {"initializer_range", 0.02},
          {"scale_attn_weights", true},
          {"tie_word_embeddings", true},
          {"bos_token_id", c.bos_token_id},
          {"eos_token_id", c.eos_token_id},
          {"torch_dtype", "float32"}};
}

std::string file_name(const std::string& key) {
  return map_tensor_name(key,
                         {{"token_embd.weight", "transformer.wte.weight"},
                          {"position_embd.weight", "transformer.wpe.weight"},
                          {"output_norm.weight", "transformer.ln_f.weight"},
                          {"output_norm.bias", "transformer.ln_f.bias"}},
                         {{"attn_norm", "ln_1"}, {"ffn_norm", "ln_2"}, {"attn_qkv", "attn.c_attn"},
                          {"attn_output", "attn.c_proj"}, {"ffn_up", "mlp.c_fc"}, {"ffn_down", "mlp.c_proj"}},
                         "transformer.h.", "GPT-2");
}

}  // namespace

extern const Family kGpt2Family = {"gpt2", "GPT2LMHeadModel", parse, to_json, file_name};

}  // namespace kiln
