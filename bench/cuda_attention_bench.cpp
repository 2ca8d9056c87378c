// Throughput of kiln's CUDA FlashAttention (kernels/cuda/attention.cu), forward and backward, bf16, at a fixed
// 16k tokens per batch and model width 2048 (B = tokens / T, NH = width / HD), for sequence lengths 1k..16k,
// head dims 64 and 128, causal and not. One JSON line per measurement, the same fields as
// bench/torch_attention_bench.py prints, so bench/attention_vs_torch_cuda.sh can put them side by side.
// FLOPs as flash-attention counts them: forward 4·B·NH·T²·HD (halved when causal), backward 2.5× forward.
//
//   ./build/cuda_attention_bench [--seqs 1024,2048,4096,8192,16384] [--hds 64,128] [--tokens 16384]
//                                [--width 2048] [--iters 20]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gpu.h"
#include "core/rng.h"
#include "kernels/attention.h"

using namespace kiln;

namespace {

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
  Rng r(seed);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f32_to_bf16(r.normal());
  return v;
}

// Mean milliseconds per call over `iters` calls after two warm-ups, timed on the stream.
template <class F>
double time_ms(F&& fn, int iters) {
  fn();
  fn();
  gpu::Timer timer;
  timer.start();
  for (int i = 0; i < iters; i++) fn();
  const double ms = timer.stop_ms();
  gpu::check("attention bench");
  return ms / iters;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> seqs = {1024, 2048, 4096, 8192, 16384}, hds = {64, 128};
  int64_t tokens = 16384;
  int width = 2048, iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--seqs")) seqs = parse_list(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--hds")) hds = parse_list(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--tokens")) tokens = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--width")) width = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s (flags: --seqs --hds --tokens --width --iters)\n", argv[i]);
      return 2;
    }
  }
  try {
    const gpu::DeviceInfo info = gpu::init(0);
    std::fprintf(stderr, "device: %s (sm_%d%d, %d SMs)\n", info.name.c_str(), info.sm_major, info.sm_minor,
                 info.sm_count);
    // N and C are the same for every shape: one set of buffers serves all.
    const int64_t N = tokens, C = width;
    gpu::DeviceBuffer qkv(size_t(N * 3 * C) * 2, "qkv"), out(size_t(N * C) * 2, "out"),
        dout(size_t(N * C) * 2, "dout"), dqkv(size_t(N * 3 * C) * 2, "dqkv");
    const auto h_qkv = random_bf16(size_t(N * 3 * C), 1), h_dout = random_bf16(size_t(N * C), 2);
    gpu::copy_to_device(qkv.data(), h_qkv.data(), h_qkv.size() * 2);
    gpu::copy_to_device(dout.data(), h_dout.data(), h_dout.size() * 2);
    gpu::DeviceBuffer lse, scratch;
    for (int hd : hds)
      for (int causal : {0, 1})
        for (int T : seqs) {
          if (T <= 0 || tokens % T != 0 || width % hd != 0) {
            std::fprintf(stderr, "skipping seq %d hd %d: tokens %% seq or width %% hd is not 0\n", T, hd);
            continue;
          }
          AttentionParams p;
          p.B = int(tokens / T), p.T = T, p.NH = width / hd, p.HD = hd, p.causal = causal != 0;
          p.scale = 1.0f / std::sqrt(float(hd));
          if (lse.size() < size_t(p.NH * N) * 4) lse.resize(size_t(p.NH * N) * 4, "lse");
          const size_t sb = cuda::attention_backward_scratch_bytes(p);
          if (scratch.size() < sb) scratch.resize(sb, "scratch");
          auto fwd = [&] {
            cuda::attention_forward(out.as<uint16_t>(), lse.as<float>(), qkv.as<uint16_t>(), p, gpu::stream());
          };
          auto bwd = [&] {
            cuda::attention_backward(dqkv.as<uint16_t>(), dout.as<uint16_t>(), qkv.as<uint16_t>(), out.as<uint16_t>(),
                                     lse.as<float>(), p, scratch.data(), gpu::stream());
          };
          const double fwd_ms = time_ms(fwd, iters);
          const double bwd_ms = time_ms(bwd, iters);
          const double flops = 4.0 * p.B * p.NH * double(T) * T * hd * (causal ? 0.5 : 1.0);
          for (int op = 0; op < 2; op++) {
            const double ms = op ? bwd_ms : fwd_ms, f = op ? 2.5 * flops : flops;
            std::printf(
                "{\"impl\": \"kiln\", \"op\": \"%s\", \"seq\": %d, \"hd\": %d, \"causal\": %s, \"batch\": %d, "
                "\"heads\": %d, \"ms\": %.4f, \"tflops\": %.2f}\n",
                op ? "bwd" : "fwd", T, hd, causal ? "true" : "false", p.B, p.NH, ms, f / (ms * 1e-3) / 1e12);
            std::fflush(stdout);
          }
        }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_attention_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
