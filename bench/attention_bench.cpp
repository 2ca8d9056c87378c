// Attention benchmark: cpu:: (FlashAttention) against ref:: (full score matrix) in the same run.
// FLOPs per head: forward 4·T²·HD (halved when causal), backward 2.5× forward.
// Prints one JSON line per (T, pass) with GFLOP/s of both (cpu: best and median run) and the ratio of best times.
//
// Standalone (not part of the CMake build):
//   g++ -O3 -march=native -fopenmp -std=gnu++20 -I. bench/attention_bench.cpp kernels/cpu/attention.cpp
//       kernels/reference/attention.cpp -o build-attn/attention_bench && ./build-attn/attention_bench [T ...]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "core/rng.h"
#include "kernels/attention.h"

using namespace kiln;

namespace {

struct Timing {
  double best_ms, median_ms;
};

// Best and median milliseconds of fn over up to reps runs (after an optional warm-up), stopping after
// budget_ms. Both are printed: on a shared machine the median carries other processes' noise.
Timing time_ms(const std::function<void()>& fn, bool warmup, int reps, double budget_ms) {
  if (warmup) fn();
  std::vector<double> ms;
  double total = 0;
  for (int r = 0; r < reps && (r == 0 || total < budget_ms); r++) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    total += ms.back();
  }
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

void bench(int B, int T, int NH, int HD, bool causal) {
  AttentionParams p;
  p.B = B; p.T = T; p.NH = NH; p.HD = HD; p.causal = causal;
  p.scale = 1.0f / std::sqrt(float(HD));
  const int64_t N = int64_t(B) * T, C = int64_t(NH) * HD;
  std::vector<float> qkv(size_t(N * 3 * C)), dout(size_t(N * C)), out(size_t(N * C)), lse(size_t(NH * N)),
      dqkv(size_t(N * 3 * C));
  Rng rng(1);
  for (auto& x : qkv) x = rng.normal();
  for (auto& x : dout) x = rng.normal();

  const double fwd_flop = double(B) * NH * 4.0 * double(T) * T * HD * (causal ? 0.5 : 1.0);
  const double fb_flop = 3.5 * fwd_flop;
  struct Pass {
    const char* name;
    double flop;
    std::function<void()> cpu_fn, ref_fn;
  };
  const Pass passes[] = {
      {"forward", fwd_flop, [&] { cpu::attention_forward(out.data(), lse.data(), qkv.data(), p); },
       [&] { ref::attention_forward(out.data(), lse.data(), qkv.data(), p); }},
      {"forward+backward", fb_flop,
       [&] {
         cpu::attention_forward(out.data(), lse.data(), qkv.data(), p);
         cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), p);
       },
       [&] {
         ref::attention_forward(out.data(), lse.data(), qkv.data(), p);
         ref::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), p);
       }},
  };
  for (const Pass& ps : passes) {
    const Timing cpu_t = time_ms(ps.cpu_fn, true, 50, 3000);
    const Timing ref_t = time_ms(ps.ref_fn, false, 3, 1);  // slow: one run
    const double cpu_gf = ps.flop / cpu_t.best_ms * 1e-6, ref_gf = ps.flop / ref_t.best_ms * 1e-6;
    std::printf(
        "{\"bench\": \"attention\", \"pass\": \"%s\", \"B\": %d, \"T\": %d, \"NH\": %d, \"HD\": %d, "
        "\"causal\": %s, \"threads\": %d, \"cpu_best_ms\": %.3f, \"cpu_median_ms\": %.3f, \"ref_ms\": %.3f, "
        "\"cpu_gflops\": %.2f, \"cpu_gflops_median\": %.2f, \"ref_gflops\": %.3f, \"speedup\": %.1f}\n",
        ps.name, B, T, NH, HD, causal ? "true" : "false", omp_get_max_threads(), cpu_t.best_ms, cpu_t.median_ms,
        ref_t.best_ms, cpu_gf, ps.flop / cpu_t.median_ms * 1e-6, ref_gf, ref_t.best_ms / cpu_t.best_ms);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Optional: a list of T values; default the two sizes of the report.
  std::vector<int> Ts;
  for (int i = 1; i < argc; i++) Ts.push_back(std::atoi(argv[i]));
  if (Ts.empty()) Ts = {64, 1024};
  for (int T : Ts) bench(4, T, 12, 64, true);
  return 0;
}
