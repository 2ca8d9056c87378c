// config.json -> ModelConfig (models/family.h parse_model_config, which validates): the input is the file's
// text. An accepted config must give sizes that fit (the derived dimensions and parameter count are computed
// here in wide arithmetic and compared), and writing it back (model_config_json) must parse to the same
// config, as saving and reloading a checkpoint does.
#include "fuzz/fuzz_util.h"
#include "models/family.h"

using namespace kiln;

namespace {

// The parameter count from the table's shapes, in 128-bit arithmetic (independent of num_params()).
__int128 table_params(const ModelConfig& c) {
  __int128 n = 0;
  for (const auto& s : model_param_table(c).specs) n += s.numel();
  return n;
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
#define SAME(f) FUZZ_CHECK(a.f == b.f, "field " #f " changed on a round trip")
  SAME(family); SAME(n_layer); SAME(d_model); SAME(n_head); SAME(n_kv_head); SAME(head_dim); SAME(d_ff);
  SAME(vocab_size); SAME(max_positions); SAME(norm); SAME(norm_bias); SAME(norm_eps); SAME(positions);
  SAME(rope_theta); SAME(rope_scaling.kind); SAME(rope_scaling.factor); SAME(rope_scaling.low_freq_factor);
  SAME(rope_scaling.high_freq_factor); SAME(rope_scaling.original_max_positions); SAME(qkv_bias);
  SAME(attn_out_bias); SAME(qk_norm); SAME(sliding_window); SAME(gated_ffn); SAME(activation); SAME(ffn_bias);
  SAME(tie_embeddings); SAME(layout); SAME(bos_token_id); SAME(eos_token_id);
#undef SAME
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name = "config.json";
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::accepts(
      [&] {
        const ModelConfig c = parse_model_config(text, name);
        c.validate(name);
        // The derived sizes every module uses must be representable.
        const __int128 q = __int128(c.n_head) * c.head_dim, kv = __int128(c.n_kv_head) * c.head_dim;
        FUZZ_CHECK(q == c.q_dim() && kv == c.kv_dim() && q + 2 * kv == c.qkv_dim(), "head sizes overflow");
        const int64_t params = c.num_params();
        FUZZ_CHECK(params > 0, "parameter count ", params);
        if (c.n_layer <= 64) FUZZ_CHECK(table_params(c) == params, "num_params ", params, " disagrees with the table");
        if (c.positions == PositionKind::Rotary && c.head_dim <= 4096)
          for (float f : c.rope_inv_freq()) FUZZ_CHECK(f == f, "NaN rotary frequency");
        const std::string again = model_config_json(c);
        expect_same(c, parse_model_config(again, "written " + name));
      },
      name);
  return 0;
}
