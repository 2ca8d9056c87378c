// Helpers for the GPU backend tests (tests/gpu/): the same sources build into kiln_gpu_tests_emu (SIMT
// emulator, runs everywhere, label unit) and, with the CUDA backend, kiln_gpu_tests (label cuda: skips
// when no GPU is present).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gpu.h"
#include "models/model.h"
#include "models/model_config.h"
#include "tests/test_util.h"

namespace kiln::test {

// Initialises the device once; false (and the test should GTEST_SKIP) when the build has no usable GPU.
inline bool gpu_ready() {
  static int state = -1;
  if (state < 0) {
#ifdef KILN_TEST_EMULATED
    setenv("KILN_GPU_EMULATOR", "1", 1);
#endif
    try {
      gpu::init(0);
      state = 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "GPU tests skipped: %s\n", e.what());
      state = 0;
    }
  }
  return state == 1;
}
#define KILN_REQUIRE_GPU() \
  if (!::kiln::test::gpu_ready()) GTEST_SKIP() << "no GPU"

// Small configs of head width 64 (the GPU attention kernels take 64 and 128): GPT-2 (Conv1D layout, biases, a
// tied head) and a Llama (RMSNorm, rotary positions, a gated SiLU FFN, an untied head).
inline ModelConfig gpu_gpt2_config(int n_layer, int d_model, int d_ff, int vocab) {
  ModelConfig c;
  c.family = "gpt2";
  c.n_layer = n_layer;
  c.d_model = d_model;
  c.n_head = c.n_kv_head = d_model / 64;
  c.head_dim = 64;
  c.d_ff = d_ff;
  c.vocab_size = vocab;
  c.max_positions = 64;
  c.qkv_bias = c.attn_out_bias = c.ffn_bias = true;
  c.layout = WeightLayout::InOut;
  return c;
}
inline ModelConfig gpu_llama_config(int n_layer, int n_head, int n_kv_head, int d_model, int d_ff, int vocab) {
  ModelConfig c;
  c.family = "llama";
  c.n_layer = n_layer;
  c.d_model = d_model;
  c.n_head = n_head;
  c.n_kv_head = n_kv_head;
  c.head_dim = 64;
  c.d_ff = d_ff;
  c.vocab_size = vocab;
  c.max_positions = 64;
  c.norm = NormKind::RMSNorm;
  c.norm_bias = false;
  c.norm_eps = 1e-6f;
  c.positions = PositionKind::Rotary;
  c.rope_theta = 10000.0;
  c.gated_ffn = true;
  c.activation = Activation::Silu;
  c.tie_embeddings = false;
  return c;
}

// A device copy of a host vector, freed with the object.
template <class T>
struct DeviceVec {
  gpu::DeviceBuffer buf;
  size_t n = 0;
  DeviceVec() = default;
  explicit DeviceVec(size_t count) : buf(std::max<size_t>(count * sizeof(T), 1), "test"), n(count) {}
  explicit DeviceVec(const std::vector<T>& host) : DeviceVec(host.size()) { upload(host); }
  void upload(const std::vector<T>& host) { gpu::copy_to_device(buf.data(), host.data(), host.size() * sizeof(T)); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    gpu::copy_to_host(h.data(), buf.data(), n * sizeof(T));
    return h;
  }
  T* get() const { return buf.as<T>(); }
};

inline std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); i++) r[i] = f32_to_bf16(x[i]);
  return r;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); i++) r[i] = bf16_to_f32(x[i]);
  return r;
}
// x rounded to bf16 and back: the input the GPU actually sees.
inline std::vector<float> round_bf16(const std::vector<float>& x) { return from_bf16(to_bf16(x)); }

// GPU values within bf16 accuracy of the CPU's: each of n within 5% of the row's largest magnitude (+1e-3).
inline void expect_close(const float* got, const float* want, int n, const std::string& where) {
  double scale = 0;
  for (int i = 0; i < n; i++) scale = std::max(scale, std::fabs(double(want[i])));
  for (int i = 0; i < n; i++) ASSERT_NEAR(got[i], want[i], 0.05 * scale + 1e-3) << where << " element " << i;
}

// ||a - b|| / ||b|| over n values (||a - b|| when b is all zero).
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The largest |x| of n values.
inline double max_abs(const float* x, int n) {
  double m = 0;
  for (int i = 0; i < n; i++) m = std::max(m, std::fabs(double(x[i])));
  return m;
}

// The fp32 CPU decoder's greedy tokens after `prompt`, and how many of the first choices are clear (the best
// logit ahead of the second by 5% of the largest |logit|) before the first that is not.
inline std::vector<int32_t> cpu_greedy(const ModelConfig& cfg, const float* P, const std::vector<int32_t>& prompt,
                                       int n, int& clear) {
  auto dec = make_decoder(cfg, P);
  std::vector<int32_t> out;
  const float* lg = dec->forward(prompt.data(), int(prompt.size()));
  clear = -1;
  for (int i = 0; i < n; i++) {
    const int V = cfg.vocab_size;
    const int32_t best = int32_t(std::max_element(lg, lg + V) - lg);
    double second = -1e30;
    for (int j = 0; j < V; j++)
      if (j != best) second = std::max(second, double(lg[j]));
    if (clear < 0 && double(lg[best]) - second <= 0.05 * max_abs(lg, V)) clear = i;
    out.push_back(best);
    lg = dec->forward(&out.back(), 1);
  }
  if (clear < 0) clear = n;
  return out;
}

}  // namespace kiln::test
