// kiln_gguf_tiny FAMILY OUT_DIR [SEED]: a tiny random model of FAMILY exported as OUT_DIR/model-{f32,f16,q8_0}.gguf,
// with its raw parameter block (params.bin, float32), table (table.json) and configuration (config.json) for the
// end-to-end test's reference forward pass (tests/e2e/gguf_llama_cpp.py).
#include <cstdio>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/file_io.h"
#include "gguf_tiny_model.h"

using namespace kiln;

static std::string json_config(const ModelConfig& c) {
  return str("{\"family\": \"", c.family, "\", \"n_layer\": ", c.n_layer, ", \"d_model\": ", c.d_model,
             ", \"n_head\": ", c.n_head, ", \"n_kv_head\": ", c.n_kv_head, ", \"head_dim\": ", c.head_dim,
             ", \"d_ff\": ", c.d_ff, ", \"vocab_size\": ", c.vocab_size, ", \"max_positions\": ", c.max_positions,
             ", \"norm_eps\": ", double(c.norm_eps), ", \"rope_theta\": ", c.rope_theta,
             ", \"rope_scaling\": \"", c.rope_scaling.kind == RopeScaling::Llama3 ? "llama3" : "none",
             "\", \"rope_factor\": ", c.rope_scaling.factor, ", \"low_freq_factor\": ", c.rope_scaling.low_freq_factor,
             ", \"high_freq_factor\": ", c.rope_scaling.high_freq_factor,
             ", \"original_max_positions\": ", c.rope_scaling.original_max_positions,
             ", \"tie_embeddings\": ", c.tie_embeddings ? "true" : "false", ", \"eos_token_id\": ", c.eos_token_id, "}\n");
}

int main(int argc, char** argv) {
  try {
    KILN_CHECK(argc == 3 || argc == 4, "usage: kiln_gguf_tiny FAMILY OUT_DIR [SEED]");
    const std::string family = argv[1], dir = argv[2];
    const uint64_t seed = argc == 4 ? std::stoull(argv[3]) : 1;
    make_dirs(dir);
    const ModelConfig cfg = test::tiny_config(family);
    const ParamTable table = test::tiny_table(cfg);
    const std::vector<float> params = test::tiny_params(table, seed);
    const GgufTokenizer tok = test::tiny_tokenizer(cfg.vocab_size, test::tiny_pre(family));
    export_gguf(dir + "/model-f32.gguf", cfg, table, params.data(), tok, GgufType::F32);
    export_gguf(dir + "/model-f16.gguf", cfg, table, params.data(), tok, GgufType::F16);
    export_gguf(dir + "/model-q8_0.gguf", cfg, table, params.data(), tok, GgufType::Q8_0);
    write_file_atomic(dir + "/params.bin",
                      std::string_view(reinterpret_cast<const char*>(params.data()), params.size() * 4));
    std::string t = "[\n";
    for (size_t i = 0; i < table.specs.size(); i++) {
      const ParamSpec& s = table.specs[i];
      t += str("  {\"name\": \"", s.name, "\", \"key\": \"", s.key, "\", \"offset\": ", s.offset, ", \"shape\": [");
      for (int d = 0; d < s.shape.ndim; d++) t += str(d ? ", " : "", s.shape[d]);
      t += i + 1 < table.specs.size() ? "]},\n" : "]}\n";
    }
    write_file_atomic(dir + "/table.json", t + "]\n");
    write_file_atomic(dir + "/config.json", json_config(cfg));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln_gguf_tiny: %s\n", e.what());
    return 1;
  }
}
