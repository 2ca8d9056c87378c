// Decoding with narrow weights (--weights-dtype, kernels/narrow_gemv.h): a small GPT-2 trained here by the
// `kiln train` loop on the bytes of the README, then the perplexity of held-out bytes through the decoder
// (chunks of 16 positions: the decode kernels, x quantized for q8_0) in each format against f32: within 0.3%
// for bf16 / f16 and 1% for q8_0. A random Llama-shaped model ([out, in] weights, gated FFN, no biases)
// checks the other layout: narrow logits close to f32's.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "core/error.h"
#include "models/checkpoint.h"
#include "models/model.h"
#include "test_util.h"
#include "train/shards.h"
#include "train/trainer.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

std::vector<uint32_t> readme_bytes() {
  std::ifstream f(std::string(KILN_SOURCE_DIR) + "/README.md", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<uint32_t> t;
  for (unsigned char c : s) t.push_back(c);  // bytes as token ids (vocab 256)
  return t;
}

// Mean negative log-likelihood (nats) of each window's next tokens, windows of T fed 16 positions at a time.
double held_out_nll(IncrementalDecoder& dec, const std::vector<int32_t>& toks, int T) {
  const int V = dec.config().vocab_size;
  double nll = 0;
  int64_t count = 0;
  for (size_t w0 = 0; w0 + size_t(T) <= toks.size(); w0 += size_t(T)) {
    dec.reset();
    for (int c0 = 0; c0 < T - 1; c0 += 16) {
      const int n = std::min(16, T - 1 - c0);
      const float* lg = dec.forward(&toks[w0 + size_t(c0)], n, /*all_logits=*/true);
      for (int i = 0; i < n; i++) {
        const float* r = lg + size_t(i) * V;
        double mx = r[0], s = 0;
        for (int v = 1; v < V; v++) mx = std::max(mx, double(r[v]));
        for (int v = 0; v < V; v++) s += std::exp(double(r[v]) - mx);
        nll += mx + std::log(s) - r[toks[w0 + size_t(c0 + i + 1)]];
        count++;
      }
    }
  }
  return nll / double(count);
}

TEST(NarrowDecode, PerplexityOfATrainedModel) {
  const fs::path dir = fs::path(KILN_BINARY_DIR) / "test_narrow_decode";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::vector<uint32_t> bytes = readme_bytes();
  ASSERT_GT(bytes.size(), 20000u);
  const size_t split = bytes.size() - 4096;
  write_shard((dir / "train.bin").string(), std::vector<uint32_t>(bytes.begin(), bytes.begin() + split));
  {
    std::ofstream c(dir / "config.json");
    c << R"({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256, "n_positions": 64})";
  }
  TrainOptions o;
  o.model = (dir / "config.json").string();
  o.data = (dir / "train.bin").string();
  o.out = (dir / "ckpt").string();
  o.batch = 8;
  o.seq = 64;
  o.steps = 200;
  o.lr = 4e-3f;
  o.warmup = 10;
  o.progress = false;
  o.threads = 1;  // a tiny model: one thread (a shared machine's spinning OpenMP barriers only slow it)
  train(o);
  set_threads(0);  // back to every core for the tests after this one

  const std::string ck = (dir / "ckpt" / "step_00000200").string();
  const ModelConfig cfg = load_model_config_for(ck);
  ModelOptions mo;
  mo.with_grads = false;
  auto model = make_model(cfg, mo);
  load_model_weights(ck, cfg, model->table(), model->host_params());
  const std::vector<int32_t> held(bytes.begin() + split, bytes.end());

  double nll[4];
  const WeightFormat fmts[] = {WeightFormat::F32, WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0};
  for (int i = 0; i < 4; i++) {
    DecoderOptions d;
    d.weights = fmts[i];
    auto dec = make_decoder(cfg, model->host_params(), d);
    nll[i] = held_out_nll(*dec, held, 64);
  }
  const double ppl32 = std::exp(nll[0]);
  // Trained: far below the 256 of a uniform guess over bytes.
  EXPECT_LT(ppl32, 40.0);
  for (int i = 1; i < 4; i++) {
    const double rel = std::fabs(std::exp(nll[i]) / ppl32 - 1.0);
    std::printf("%s: perplexity %.4f (f32 %.4f), relative %.5f\n", weight_format_name(fmts[i]), std::exp(nll[i]),
                ppl32, rel);
    EXPECT_LT(rel, fmts[i] == WeightFormat::Q8_0 ? 0.01 : 0.003) << weight_format_name(fmts[i]);
  }
}

TEST(NarrowDecode, LlamaLayoutLogitsCloseToF32) {
  ModelConfig cfg;
  const fs::path dir = fs::path(KILN_BINARY_DIR) / "test_narrow_decode_llama";
  fs::create_directories(dir);
  {
    std::ofstream c(dir / "config.json");
    c << R"({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 300, "max_position_embeddings": 64,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false})";
  }
  cfg = load_model_config((dir / "config.json").string());
  ModelOptions mo;
  mo.with_grads = false;
  auto model = make_model(cfg, mo);
  model->init_random(3);
  std::vector<int32_t> toks(40);
  for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 37 + 11) % 300);
  std::vector<std::vector<float>> out;
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0}) {
    DecoderOptions d;
    d.weights = f;
    auto dec = make_decoder(cfg, model->host_params(), d);
    dec->forward(toks.data(), 30);  // prefill: the widened-tile path
    std::vector<float> lg;
    for (int t = 30; t < 40; t++) {  // single steps: the direct kernels
      const float* l = dec->forward(&toks[size_t(t)], 1);
      lg.insert(lg.end(), l, l + cfg.vocab_size);
    }
    out.push_back(lg);
  }
  // Relative rms error of the logits. One rounding of a weight is at most 2^-9 (bf16) / 2^-12 (f16) of it
  // (rms about 0.6 of that), q8_0's up to 1/254 of its block's largest weight (~1/100 of a typical one, rms
  // ~0.3%, and x's the same): per product about 0.1% / 0.015% / 0.5%, compounded over the 2 layers' 4
  // products and the head (a few times that). The bounds allow 3x more.
  auto rel_rms = [](const std::vector<float>& a, const std::vector<float>& b) {
    double e = 0, n = 0;
    for (size_t i = 0; i < a.size(); i++) e += (a[i] - b[i]) * double(a[i] - b[i]), n += double(b[i]) * b[i];
    return std::sqrt(e / n);
  };
  const double bf = rel_rms(out[1], out[0]), f16 = rel_rms(out[2], out[0]), q8 = rel_rms(out[3], out[0]);
  std::printf("relative rms logit error: bf16 %.5f, f16 %.5f, q8_0 %.5f\n", bf, f16, q8);
  EXPECT_LT(bf, 0.01);
  EXPECT_LT(f16, 0.0015);
  EXPECT_LT(q8, 0.05);
  EXPECT_GT(bf, 0.0);  // the narrow weights were used
}

TEST(NarrowDecode, RejectsTheGpuDecoder) {
  ModelConfig cfg = load_model_config(std::string(KILN_SOURCE_DIR) + "/bench/gpt2-124m.json");
  DecoderOptions d;
  d.cuda = true;
  d.weights = WeightFormat::Q8_0;
  EXPECT_THROW(make_decoder(cfg, nullptr, d), Error);
}

}  // namespace
