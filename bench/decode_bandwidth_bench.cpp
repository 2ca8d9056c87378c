// Batch-1 decoding against the memory bandwidth, per weight format (kiln generate --weights-dtype): one token
// reads every weight matrix once, so tokens/s × bytes per token is the bandwidth the decoder draws. The peer,
// measured in the same run on the same threads: a plain streaming read (AVX-512 loads summed, over a buffer
// far larger than the caches), the most a token step could draw. Prints, per format: the bytes a token reads
// (the matrices in that format, plus the KV cache at the mean position), the median tokens/s over the steps,
// the bandwidth that implies, and its fraction of the streaming read (the goal: >= 0.85), also as the median of
// each round's own fraction.
//
//   ./build/decode_bandwidth_bench [--config bench/gpt2-124m.json] [--threads 2] [--steps 64] [--formats f32,...]
//                                  [--isa avx512|avx2|portable]: the narrow kernels capped at that level (the AVX2
//                                  ones measured on an AVX-512 CPU, say)
//   ./build/decode_bandwidth_bench --peer-only 1 [--threads 2] [--steps 5]: the streaming read alone (median of
//   --steps reads), for a driver that interleaves it with its own runs (bench/decode_formats.py).
#include <immintrin.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/memory.h"
#include "kernels/matmul.h"
#include "kernels/narrow_gemv.h"
#include "models/family.h"
#include "models/model.h"
#include "train/trainer.h"

using namespace kiln;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// GB/s of one read of p[0, bytes) with every thread streaming its own contiguous slice.
double read_bandwidth(const float* p, size_t bytes) {
  const int64_t n = int64_t(bytes / sizeof(float)) / 64 * 64;
  static volatile float sink = 0;
  const auto t0 = Clock::now();
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (n / T) / 64 * 64, b = per * t, e = t == T - 1 ? n : b + per;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = b; i < e; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else  // AVX: eight 32-byte accumulators for each 256-byte step
    __m256 a[8];
    for (__m256& v : a) v = _mm256_setzero_ps();
    for (int64_t i = b; i < e; i += 64)
      for (int j = 0; j < 8; j++) a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
    alignas(32) float lanes[8];
    for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);
    _mm256_store_ps(lanes, a[0]);
    for (float x : lanes) total += x;
#endif
  }
  sink = sink + total;
  return double(n) * sizeof(float) / std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;
}

// Bytes of the weight matrices one token reads in format f.
double matrix_bytes(const ModelConfig& c, WeightFormat f) {
  auto m = [&](int64_t out, int64_t in) {
    return f == WeightFormat::F32 ? double(out) * double(in) * 4 : double(narrow_bytes(f, out, in));
  };
  const int64_t up = c.gated_ffn ? 2 * int64_t(c.d_ff) : c.d_ff;
  double b = m(c.vocab_size, c.d_model);
  b += double(c.n_layer) * (m(c.qkv_dim(), c.d_model) + m(c.d_model, c.q_dim()) + m(up, c.d_model) + m(c.d_model, c.d_ff));
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  // The prompt's prefill runs sgemm: OpenBLAS with this CPU's kernels (kernels/matmul.h), as the CLI does.
  bench::prefer_blas_core(argv);
  std::string config = std::string(KILN_SOURCE_DIR) + "/bench/gpt2-124m.json";
  std::string formats = "f32,bf16,f16,q8_0";
  int threads = 2, steps = 64, prompt = 16, peer_only = 0;
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (i + 1 == argc) {
      std::fprintf(stderr, "decode_bandwidth_bench: %s needs a value\n", a.c_str());
      return 2;
    }
    if (a == "--config") config = argv[i + 1];
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--steps") steps = std::atoi(argv[i + 1]);
    else if (a == "--formats") formats = argv[i + 1];
    else if (a == "--peer-only") peer_only = std::atoi(argv[i + 1]);
    else if (a == "--isa") {
      const std::string v = argv[i + 1];
      if (v != "avx512" && v != "avx2" && v != "portable") {
        std::fprintf(stderr, "decode_bandwidth_bench: --isa %s: expected avx512, avx2 or portable\n", v.c_str());
        return 2;
      }
      cpu::narrow_limit_isa(v == "avx512" ? cpu::NarrowIsa::Avx512
                            : v == "avx2" ? cpu::NarrowIsa::Avx2
                                          : cpu::NarrowIsa::Portable);
    } else {
      std::fprintf(stderr, "decode_bandwidth_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  set_threads(threads);
  const size_t peer_bytes = size_t(512) << 20;
  if (peer_only) {
    Buffer buf(peer_bytes);
    std::vector<double> peer;
    for (int s = 0; s < std::max(1, steps); s++)
      peer.push_back(read_bandwidth(static_cast<const float*>(buf.data()), peer_bytes));
    std::printf("peer: streaming read of 512 MiB, median of %d: %.1f GB/s\n", int(peer.size()), median(peer));
    return 0;
  }
  const ModelConfig cfg = load_model_config(config);
  ModelOptions mo;
  mo.with_grads = false;
  auto model = make_model(cfg, mo);
  model->init_random(1);

  std::printf("decode_bandwidth_bench: %s, %d threads, %d rounds after a %d-token prompt\n", config.c_str(), threads,
              steps, prompt);
  // Every decoder is built first; then each round times one streaming read (the peer) and one token step of
  // every format, so that all of them see the same load on a shared machine. Medians over the rounds.
  std::vector<WeightFormat> fs;
  for (size_t at = 0; at <= formats.size();) {
    size_t e = formats.find(',', at);
    if (e == std::string::npos) e = formats.size();
    const std::string name = formats.substr(at, e - at);
    at = e + 1;
    const auto f = parse_weight_format(name);
    if (!f) {
      std::fprintf(stderr, "decode_bandwidth_bench: unknown format %s\n", name.c_str());
      return 2;
    }
    fs.push_back(*f);
  }
  std::vector<std::unique_ptr<IncrementalDecoder>> decs;
  std::vector<int32_t> next(fs.size());
  std::vector<int32_t> toks(static_cast<size_t>(prompt));
  for (int i = 0; i < prompt; i++) toks[size_t(i)] = (i * 7919) % cfg.vocab_size;
  for (size_t i = 0; i < fs.size(); i++) {
    DecoderOptions d;
    d.weights = fs[i];
    decs.push_back(make_decoder(cfg, model->host_params(), d));
    next[i] = decs[i]->forward_argmax(toks.data(), prompt, cfg.vocab_size)[0];
  }
  Buffer buf(peer_bytes);  // zero-filled: its pages exist
  std::vector<double> peer;
  std::vector<std::vector<double>> per(fs.size());
  for (int s = 0; s < steps; s++) {
    peer.push_back(read_bandwidth(static_cast<const float*>(buf.data()), peer_bytes));
    for (size_t i = 0; i < fs.size(); i++) {
      const auto t0 = Clock::now();
      next[i] = decs[i]->forward_argmax(&next[i], 1, cfg.vocab_size)[0];
      per[i].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
  }
  const double bw = median(peer);
  std::printf("peer: streaming read of 512 MiB, median of %d: %.1f GB/s\n", steps, bw);
  std::printf("%-6s %-12s %10s %10s %10s %8s %8s\n", "format", "kernel", "MB/token", "tokens/s", "GB/s", "ratio",
              "rounds");
  for (size_t i = 0; i < fs.size(); i++) {
    const double mean_pos = prompt + steps / 2.0;
    const double kv = double(cfg.n_layer) * 2 * mean_pos * cfg.kv_dim() * 4;
    const double bytes = matrix_bytes(cfg, fs[i]) + kv;
    const double tps = 1.0 / median(per[i]);
    const double gbs = bytes * tps / 1e9;
    // rounds: the median over the rounds of each round's own ratio (its step against the read just before it),
    // steadier than the ratio of the medians when the machine's other tenants come and go.
    std::vector<double> own;
    for (size_t r = 0; r < per[i].size(); r++) own.push_back(bytes / per[i][r] / 1e9 / peer[r]);
    std::printf("%-6s %-12s %10.1f %10.1f %10.1f %8.3f %8.3f\n", weight_format_name(fs[i]),
                fs[i] == WeightFormat::F32 ? "gemv-f32" : cpu::narrow_kernel_name(fs[i]), bytes / 1e6, tps, gbs, gbs / bw,
                median(own));
  }
  return 0;
}
