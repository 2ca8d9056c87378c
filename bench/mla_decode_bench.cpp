// Latent-attention decoding beside grouped-query attention of the same width, on the CPU: KV-cache bytes per
// token and single-token decode tokens/s at a 1k-token context. Two 4-layer models of width 1024 with 16 query
// heads and random weights: deepseek_v3 (kv_lora_rank 256, rotary key 32, q/k heads 64 + 32, v heads 64,
// q_lora_rank 384), decoded in the absorbed form and in the plain (expanded) one; and llama with 4 key/value
// heads of 64 (the peer, measured in the same run). Each prefills 1024 random tokens, then decodes 32 tokens one
// at a time; the median step time is reported.
//
// usage: mla_decode_bench [--threads N] [--context T] [--steps S]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"

using namespace kiln;

namespace {

const char* kMla = R"({"model_type":"deepseek_v3","hidden_size":1024,"num_attention_heads":16,
  "num_hidden_layers":4,"intermediate_size":2816,"vocab_size":4096,"max_position_embeddings":2048,
  "q_lora_rank":384,"kv_lora_rank":256,"qk_nope_head_dim":64,"qk_rope_head_dim":32,"v_head_dim":64,
  "hidden_act":"silu","tie_word_embeddings":false})";
const char* kGqa = R"({"model_type":"llama","hidden_size":1024,"num_attention_heads":16,"num_key_value_heads":4,
  "num_hidden_layers":4,"intermediate_size":2816,"vocab_size":4096,"max_position_embeddings":2048,
  "hidden_act":"silu","tie_word_embeddings":false})";

struct Result {
  double bytes_per_token, ms_median, tok_s;
};

Result run(const ModelConfig& cfg, int context, int steps, int absorbed) {
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(5);
  TransformerDecoder d(cfg, m->host_params(), 1, context + steps + 1);
  if (absorbed >= 0) d.set_latent_absorbed(absorbed == 1);
  Rng r(3);
  std::vector<int32_t> prompt(static_cast<size_t>(context), 0);
  for (int32_t& t : prompt) t = int32_t(r.below(uint64_t(cfg.vocab_size)));
  d.forward(prompt.data(), context);
  std::vector<double> ms;
  int32_t tok = 1;
  for (int s = 0; s < steps; s++) {
    const auto t0 = std::chrono::steady_clock::now();
    tok = *d.forward_argmax(&tok, 1, cfg.vocab_size);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  return {double(cfg.cache_floats_per_token()) * sizeof(float), med, 1e3 / med};
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, context = 1024, steps = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    if (a == "--context") context = std::atoi(argv[i + 1]);
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
  }
  if (threads > 0) omp_set_num_threads(threads);
  const ModelConfig mla = parse_model_config(kMla, "mla"), gqa = parse_model_config(kGqa, "gqa");
  const Result g = run(gqa, context, steps, -1);
  const Result a = run(mla, context, steps, 1);
  const Result p = run(mla, context, steps, 0);
  std::printf("decode at a %d-token context, %d threads, median of %d steps\n", context, omp_get_max_threads(), steps);
  std::printf("  %-30s %9s %10s %9s %s\n", "", "KV B/tok", "ms/token", "tok/s", "vs GQA");
  auto line = [&](const char* name, const Result& r) {
    std::printf("  %-30s %9.0f %10.3f %9.1f  %.2fx tok/s, %.3fx KV bytes\n", name, r.bytes_per_token, r.ms_median,
                r.tok_s, r.tok_s / g.tok_s, r.bytes_per_token / g.bytes_per_token);
  };
  line("llama GQA 16q/4kv x 64 (peer)", g);
  line("deepseek_v3 MLA absorbed", a);
  line("deepseek_v3 MLA plain", p);
  return 0;
}
